"""Progress: rate and ETA on a known clock, resumed work not counted, logged on process 0 only."""

import logging
import types

import pytest

from puma_jax import progress


class _Clock:
  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t


@pytest.fixture
def clock(monkeypatch):
  fake = _Clock()
  monkeypatch.setattr(progress, 'time', types.SimpleNamespace(perf_counter=fake))
  return fake


def test_rate_elapsed_and_eta_for_a_known_elapsed_time(clock):
  logged = []
  p = progress.Progress('margins', total=100, unit='examples', log_fn=logged.append)
  clock.t += 5.0
  p.update(20)
  assert p.rate == 4.0
  assert logged == ['margins: 20/100 examples, 4.0 examples/s, elapsed 0m05s, ETA 0m20s']


def test_resumed_work_is_not_counted_in_the_rate(clock):
  logged = []
  p = progress.Progress('evaluate', total=100, initial=40, log_fn=logged.append)
  clock.t += 5.0
  p.update(20)
  assert p.done == 60 and p.rate == 4.0
  # 40 left at 4 examples/s; counting the resumed 40 would give 12/s and 3 s.
  assert logged == ['evaluate: 60/100 examples, 4.0 examples/s, elapsed 0m05s, ETA 0m10s']


def test_eta_in_hours_unknown_at_rate_zero_and_absent_without_a_total(clock):
  logged = []
  p = progress.Progress('train', total=20_000, unit='steps', log_fn=logged.append)
  p.update(0)
  clock.t += 10.0
  p.update(10, force=True)
  assert logged == [
    'train: 0/20000 steps, 0.0 steps/s, elapsed 0m00s, ETA ?',
    'train: 10/20000 steps, 1.0 steps/s, elapsed 0m10s, ETA 5h33m10s',
  ]
  logged.clear()
  q = progress.Progress('listing', total=None, unit='classes', log_fn=logged.append)
  clock.t += 10.0
  q.update(30)
  assert logged == ['listing: 30 classes, 3.0 classes/s']


def test_logs_at_most_every_every_s_unless_forced_and_once_on_close(clock):
  logged = []
  p = progress.Progress('margins', total=100, every_s=10.0, log_fn=logged.append)
  for dt, force in [(1, False), (4, False), (0, True), (9, False), (1, False), (3, False)]:
    clock.t += dt
    p.update(1, extra=f'at {clock.t - 1000:g}', force=force)
  p.close(extra='not converged: 3')
  assert [m.split(', at ')[-1] for m in logged[:-1]] == ['1', '5', '15']
  assert logged[-1].endswith(', not converged: 3 (done)')
  assert logged[-1].startswith('margins: 6/100 examples, 0.3 examples/s, elapsed 0m18s')


def test_default_destination_is_absl_info_logging_not_stdout(clock, caplog, capsys):
  caplog.set_level(logging.INFO)
  p = progress.Progress('margins', total=10)
  clock.t += 2.0
  p.update(4)
  p.close()
  records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
  assert records == [
    ('absl', logging.INFO, 'margins: 4/10 examples, 2.0 examples/s, elapsed 0m02s, ETA 0m03s'),
    (
      'absl',
      logging.INFO,
      'margins: 4/10 examples, 2.0 examples/s, elapsed 0m02s, ETA 0m03s (done)',
    ),
  ]
  assert capsys.readouterr().out == ''


def test_only_process_zero_logs(clock, monkeypatch):
  monkeypatch.setattr(progress.jax, 'process_index', lambda: 1)
  logged = []
  p = progress.Progress('margins', total=10, log_fn=logged.append)
  clock.t += 1.0
  p.update(5, force=True)
  p.close()
  assert logged == [] and p.done == 5


def test_eta_is_zero_past_the_total(clock):
  logged = []
  p = progress.Progress('train', total=10, unit='steps', log_fn=logged.append)
  clock.t += 4.0
  p.update(12)
  assert logged == ['train: 12/10 steps, 3.0 steps/s, elapsed 0m04s, ETA 0m00s']
