"""Metric writer: JSON lines, TensorBoard events, resume without duplicated steps."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from puma_jax import metric_writer
from puma_jax.metric_writer import MetricWriter


def _events(workdir):
  """(step, tag, value) of every scalar, and the steps of session-START (purge) events."""
  scalars, starts = [], []
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack('<Q', data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 16 + length
      for v in event.summary.value:
        scalars.append((event.step, v.tag, v.simple_value))
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        starts.append(event.step)
  return scalars, starts


def test_lines_are_flushed_per_step_and_read_back(tmp_path):
  writer = MetricWriter(tmp_path)
  writer.write_scalars(1, {'loss': jnp.float32(2.5), 'accuracy': np.float64(0.25), 'count': 7})
  # Readable while the run is going, before close.
  assert metric_writer.read_metrics(tmp_path) == [
    {'step': 1, 'loss': 2.5, 'accuracy': 0.25, 'count': 7}
  ]
  writer.write_scalars(2, {'loss': jnp.asarray(1.5)})
  writer.write_scalars(2, {'eval_accuracy': 0.5})
  writer.close()
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [1, 2, 2]
  assert metric_writer.read_metrics(tmp_path / 'metrics.jsonl', merge=True)[1] == {
    'step': 2,
    'loss': 1.5,
    'eval_accuracy': 0.5,
  }
  scalars, _ = _events(tmp_path)
  assert (1, 'loss', 2.5) in scalars and (2, 'eval_accuracy', 0.5) in scalars


def test_resume_drops_later_steps_so_none_is_duplicated(tmp_path):
  with MetricWriter(tmp_path) as writer:
    for step in range(1, 6):
      writer.write_scalars(step, {'loss': float(step)})
  # Restored from the checkpoint of step 3: steps 4 and 5 are about to be redone.
  with MetricWriter(tmp_path, resume_step=3) as writer:
    assert [r['step'] for r in metric_writer.read_metrics(tmp_path)] == [1, 2, 3]
    for step in range(4, 7):
      writer.write_scalars(step, {'loss': 10.0 * step})
  records = metric_writer.read_metrics(tmp_path)
  assert [(r['step'], r['loss']) for r in records] == [
    (1, 1.0),
    (2, 2.0),
    (3, 3.0),
    (4, 40.0),
    (5, 50.0),
    (6, 60.0),
  ]
  scalars, starts = _events(tmp_path)
  assert 4 in starts  # TensorBoard purges the first run's events from step 4 on
  assert (5, 'loss', 50.0) in scalars


def test_fresh_start_drops_old_lines(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(1, {'loss': 1.0})
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(1, {'loss': 2.0})
  assert metric_writer.read_metrics(tmp_path) == [{'step': 1, 'loss': 2.0}]
  assert not list(tmp_path.glob('events.out.tfevents.*'))


def test_partial_last_line(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(1, {'loss': 1.0})
    writer.write_scalars(2, {'loss': 0.5})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 3, "lo')  # killed mid-write
  assert [r['step'] for r in metric_writer.read_metrics(tmp_path)] == [1, 2]
  with MetricWriter(tmp_path, resume_step=2, tensorboard=False) as writer:
    writer.write_scalars(3, {'loss': 0.25})
  assert [r['step'] for r in metric_writer.read_metrics(tmp_path)] == [1, 2, 3]
  # A broken line in the middle is an error, not silently skipped.
  text = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  (tmp_path / 'metrics.jsonl').write_text('\n'.join([text[0], '{oops', *text[1:]]) + '\n')
  with pytest.raises(ValueError, match='metrics.jsonl:2'):
    metric_writer.read_metrics(tmp_path)


def test_non_finite_values_are_kept(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(1, {'loss': jnp.float32(np.nan), 'grad_norm': np.inf})
  (record,) = metric_writer.read_metrics(tmp_path)
  assert np.isnan(record['loss']) and record['grad_norm'] == np.inf


def test_bad_values(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match='not a scalar'):
      writer.write_scalars(1, {'loss': jnp.zeros(3)})
    with pytest.raises(TypeError, match="'name' is a str"):
      writer.write_scalars(1, {'name': 'x'})
    with pytest.raises(ValueError, match='reserved'):
      writer.write_scalars(1, {'step': 1})
    writer.write_scalars(5, {'loss': 1.0})
    with pytest.raises(ValueError, match='step 4 come after step 5'):
      writer.write_scalars(4, {'loss': 1.0})


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  with MetricWriter(tmp_path / 'run') as writer:
    writer.write_scalars(1, {'loss': 1.0})
  assert not (tmp_path / 'run').exists()
