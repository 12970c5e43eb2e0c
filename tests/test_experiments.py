"""The pruning sweep and the margin-scaling study, run --tiny end to end.

One tiny sweep (none and puma; the base stages once) is shared by the tests of
this module; the margin-scaling study borrows its margin model. DeepFool is cut
to 1 step here (a test-only shrink of the tiny config) to keep the margin
stage of the 6,000 tiny training examples short.
"""

import csv
import json
import os

import pytest

from experiments import margin_scaling, pruning_sweep
from puma_jax import margins, pipeline, stages

SWEEP_ARGS = ['--tiny', '--strategies=none,puma', '--fractions=0.5', '--seeds=0']
SWEEP_ARGS += ['--eval_examples=32']


def _shrunk(original):
  def config(tiny):
    c = original(tiny)
    c.margins.max_iter = 1
    return c

  return config


@pytest.fixture(scope='module')
def shrunk_configs():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pruning_sweep, 'default_config', _shrunk(pruning_sweep.default_config))
    mp.setattr(margin_scaling, 'default_config', _shrunk(margin_scaling.default_config))
    yield


@pytest.fixture(scope='module')
def sweep(tmp_path_factory, shrunk_configs):
  out = tmp_path_factory.mktemp('sweep')
  text = pruning_sweep.main([f'--out={out}', *SWEEP_ARGS])
  return out, text


def _rows(path):
  with open(path) as f:
    return {r['run']: r for r in csv.DictReader(f)}


def test_sweep_writes_one_row_per_run_with_its_pruning_and_accuracies(sweep):
  out, text = sweep
  rows = _rows(out / 'runs.csv')
  assert sorted(rows) == ['none_s0', 'puma_f0.5_s0']
  none, puma = rows['none_s0'], rows['puma_f0.5_s0']
  # The tiny default: 4,000 real digits (all kept) and 2,000 generated; puma drops half of these.
  assert (int(none['kept_real']), int(none['kept_generated'])) == (4000, 2000)
  assert (int(puma['kept_real']), int(puma['kept_generated'])) == (4000, 1000)
  assert int(none['eps_reduced']) == 0 and int(puma['eps_reduced']) > 0
  for r in rows.values():
    acc = {m: float(r[m]) for m in pruning_sweep.METRICS}
    assert 0.0 <= acc['worst_case_acc'] <= acc['autoattack_acc'] <= acc['clean_acc'] <= 100.0
    assert acc['worst_case_acc'] <= min(acc['pgd_ce_acc'], acc['pgd_cw_acc'])
    assert int(r['eval_examples']) == 32
    assert float(r['train_s']) > 0 and float(r['evaluate_s']) > 0
    # The numbers come from the run's own evaluation report.
    report = json.loads((out / 'runs' / r['run'] / 'evaluate' / 'report.json').read_text())
    assert float(r['autoattack_acc']) == report['autoattack_acc']
  assert '| no pruning | 0 | 6,000 (4,000 + 2,000) |' in text
  assert '| PUMA (drop easy, eps_i from margin) | 0.5 | 5,000 (4,000 + 1,000) |' in text
  assert (out / 'table.md').read_text() == text
  with open(out / 'summary.csv') as f:
    summary = list(csv.DictReader(f))
  assert [(r['strategy'], r['fraction'], r['seeds']) for r in summary] == [
    ('none', '0.0', '1'),
    ('puma', '0.5', '1'),
  ]
  assert float(summary[1]['autoattack_acc_mean']) == float(puma['autoattack_acc'])
  assert (out / 'accuracy_vs_robustness.png').stat().st_size > 10_000
  saved = json.loads((out / 'sweep.json').read_text())
  assert saved['runs'] == ['none_s0', 'puma_f0.5_s0'] and saved['settings']['train_steps'] == 20


def test_sweep_runs_reuse_the_base_margin_model_and_margins(sweep):
  out, _ = sweep
  base = json.loads((out / 'base' / 'margins' / 'stage.json').read_text())['outputs']
  run = out / 'runs' / 'puma_f0.5_s0'
  assert json.loads((run / 'margins' / 'stage.json').read_text())['outputs'] == {
    **base,
    'summary': str(run / 'margins' / 'summary.json'),
  }
  assert not (run / 'margin_model' / 'checkpoints').exists()  # loaded, not trained
  config = json.loads((run / 'config.json').read_text())
  assert config['margin_model'] == {
    'source': 'checkpoint',
    'path': str(out / 'base' / 'margin_model'),
    'num_steps': config['margin_model']['num_steps'],
  }
  # The sidecars are those the base wrote: one manifest per split and quantity, untouched.
  base_marker = (out / 'base' / 'margins' / 'stage.json').stat().st_mtime_ns
  files = pruning_sweep.margin_files(out / 'data')
  assert len([f for f in files if f.endswith('manifest.json')]) == 2 * 3
  assert all(mtime <= base_marker for _, mtime, _ in files.values())
  # No margins for the unpruned run: its margin stages are skipped.
  assert not (out / 'runs' / 'none_s0' / 'margins').exists()


def test_the_reuse_check_fails_when_a_sidecar_is_rewritten(sweep):
  out, _ = sweep
  settings = pruning_sweep.parse_args([f'--out={out}', *SWEEP_ARGS])
  run = pruning_sweep.Run('puma', 0.5, 0)
  workdir = pruning_sweep.run_dir(settings, run)
  base = {
    'model_fingerprint': json.loads((workdir / 'margins' / 'stage.json').read_text())['outputs'][
      'model_fingerprint'
    ],
    'margin_files': pruning_sweep.margin_files(out / 'data'),
  }
  pruning_sweep._check_margins_reused(settings, run, workdir, base)  # as the sweep left it
  path = next(p for p in (out / 'data').rglob('*.margins.npy'))
  st = path.stat()
  try:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(RuntimeError, match='rewrote margin sidecars'):
      pruning_sweep._check_margins_reused(settings, run, workdir, base)
    with pytest.raises(RuntimeError, match='not the base margin model'):
      other = {**base, 'model_fingerprint': 'sha256:other'}
      pruning_sweep._check_margins_reused(settings, run, workdir, other)
  finally:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_sweep_rerun_does_no_work_and_other_settings_are_refused(sweep, monkeypatch):
  out, text = sweep

  def must_not_run(ctx):
    raise AssertionError('a finished stage ran again')

  monkeypatch.setattr(pipeline, 'RUNNERS', {name: must_not_run for name in pipeline.STAGES})
  again = pruning_sweep.main([f'--out={out}', *SWEEP_ARGS])
  strip = lambda t: [line for line in t.splitlines() if 'this invocation' not in line]
  assert strip(again) == strip(text)  # the same table, with the times measured the first time
  with pytest.raises(stages.ConfigMismatchError, match='another --out'):
    pruning_sweep.main([f'--out={out}', *SWEEP_ARGS, '--train_steps=7'])


@pytest.mark.parametrize(
  ('module', 'argv', 'flag'),
  [
    (pruning_sweep, ['--fractions=0.5,1'], '--fractions'),
    (pruning_sweep, ['--fractions=0.5,x'], '--fractions'),
    (pruning_sweep, ['--strategies=none,keep_all'], '--strategies'),
    (pruning_sweep, ['--seeds=0,0'], '--seeds'),
    (pruning_sweep, ['--train_steps=0'], '--train_steps'),
    (margin_scaling, ['--sizes=400,200'], '--sizes'),
    (margin_scaling, ['--margin_model=/nonexistent'], '--margin_model'),
  ],
)
def test_bad_flags_are_refused_naming_the_flag(tmp_path, capsys, module, argv, flag):
  with pytest.raises(SystemExit):
    module.parse_args([f'--out={tmp_path}', *argv])
  assert flag in capsys.readouterr().err


def test_margin_scaling_scores_each_size_with_one_margin_model(sweep, tmp_path, monkeypatch):
  sweep_out, _ = sweep
  out = tmp_path / 'scaling'
  argv = [
    f'--out={out}',
    '--tiny',
    '--sizes=96,192',
    f'--margin_model={sweep_out}/base/margin_model',
  ]
  text = margin_scaling.main(argv)
  with open(out / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [int(r['examples']) for r in rows] == [96, 192]
  fingerprint = json.loads((sweep_out / 'base' / 'margins' / 'stage.json').read_text())['outputs'][
    'model_fingerprint'
  ]
  assert json.loads((out / 'scaling.json').read_text())['model_fingerprint'] == fingerprint
  for r in rows:
    n = int(r['examples'])
    summary = json.loads((out / 'sizes' / f'n{n}' / 'summary.json').read_text())
    assert summary['settings']['model_fingerprint'] == fingerprint
    assert summary['overall']['count'] == n
    assert summary['settings']['deepfool']['max_iter'] == 1
    assert float(r['examples_per_s']) > 0 and float(r['seconds']) > 0
    assert 0 <= int(r['below_eps']) <= n and r['resumed'] == 'False'
    quantiles = [float(r[f'q{q}']) for q in margin_scaling.QUANTILES]
    assert quantiles == sorted(quantiles)
    assert f'| {n:,} |' in text
  # The DeepFool program is compiled at most once, for the first size.
  assert float(rows[1]['compile_seconds']) == 0.0
  assert (out / 'margin_scaling.png').stat().st_size > 10_000

  # A rerun loads the saved results and margins instead of computing them.
  def must_not_run(*args, **kwargs):
    raise AssertionError('margins computed again')

  monkeypatch.setattr(margins, 'compute_margins', must_not_run)
  with open(out / 'results.csv') as f:
    before = f.read()
  margin_scaling.main(argv)
  with open(out / 'results.csv') as f:
    assert f.read() == before
