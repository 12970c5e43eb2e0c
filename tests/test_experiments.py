"""The study and the margin-scaling study, run --tiny end to end.

One tiny study (the `--tiny` grid, one seed; the base stages once) is shared
by the tests of this module; the margin-scaling study borrows its margin model.
DeepFool is cut to 1 step here (a test-only shrink of the tiny config) to keep
the margin stage of the 6,000 tiny training examples short.
"""

import csv
import json

import ml_collections
import pytest

from experiments import margin_scaling, study, study_report
from puma_jax import margins, pipeline, report
from puma_jax.attacks import autoattack


def _shrunk(original):
  def config(tiny):
    c = original(tiny)
    c.margins.max_iter = 1
    return c

  return config


@pytest.fixture(scope='module')
def shrunk_configs():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(study, 'default_config', _shrunk(study.default_config))
    mp.setattr(margin_scaling, 'default_config', _shrunk(margin_scaling.default_config))
    yield


@pytest.fixture(scope='module')
def tiny_study(tmp_path_factory, shrunk_configs):
  out = tmp_path_factory.mktemp('study')
  text = study.main([f'--workdir={out}', '--tiny'])
  return out, text


def _rows(path):
  with open(path) as f:
    return {r['run']: r for r in csv.DictReader(f)}


def test_study_runs_each_available_setting_with_its_own_report(tiny_study):
  out, text = tiny_study
  rows = _rows(out / 'runs.csv')
  available = [
    s for s in study.grid() if s.name in study.TINY_SETTINGS and not study.missing_fields(s)
  ]
  assert sorted(rows) == sorted(f'{s.name}_s0' for s in available)
  for r in rows.values():
    config = json.loads((out / 'runs' / r['run'] / 'config.json').read_text())
    setting = next(s for s in study.grid() if s.name == r['setting'])
    assert config['prune']['strategy'] == setting.strategy
    assert config['prune']['fraction'] == setting.ratio
    assert config['train']['num_steps'] == 20  # matched steps: the tiny config's
    # The accuracies are the run's own evaluation, read from its report.json.
    report = json.loads((out / 'runs' / r['run'] / 'report.json').read_text())
    for m in study.METRICS:
      assert float(r[m]) == report['evaluation_report'][m]
    assert float(r['worst_case_acc']) <= min(float(r['pgd_ce_acc']), float(r['pgd_cw_acc']))
    # The training radius: the attack's eps without PUMA, below it with it.
    eps = config['attack']['eps']
    if setting.strategy == 'puma':
      assert -eps < float(r['mean_eps']) < eps  # signed: eps_i = m_i below eps
    else:
      assert float(r['mean_eps']) == pytest.approx(eps)
  # The standard adversarial training baseline: no pruning and a constant eps.
  at = json.loads((out / 'runs' / 'at_s0' / 'config.json').read_text())
  assert at['prune']['strategy'] == 'none'
  assert '| adversarial training (no pruning, constant eps) | 1 |' in text
  assert (out / 'summary.md').read_text() == text
  for png in ('accuracy_vs_robustness.png', 'robust_vs_ratio.png', 'baseline_curve.png'):
    assert (out / png).stat().st_size > 10_000


def test_autoattack_runs_on_the_baseline_and_the_best_puma_setting(tiny_study):
  out, text = tiny_study
  rows = _rows(out / 'runs.csv')
  puma = [r for r in rows.values() if r['strategy'] == 'puma']
  best = max(puma, key=lambda r: float(r['worst_case_acc']))['setting']
  with_aa = sorted(r['setting'] for r in rows.values() if r['autoattack_acc'])
  assert with_aa == sorted({'at', best})
  for name in with_aa:
    report = json.loads((out / 'runs' / f'{name}_s0' / 'autoattack' / 'report.json').read_text())
    assert float(rows[f'{name}_s0']['autoattack_acc']) == report['autoattack_acc']
    assert report['autoattack_acc'] <= report['clean_acc']
  assert f'AutoAttack (standard) on at and {best}' in text


def test_the_wall_time_adds_up_over_invocations(tiny_study):
  out, _ = tiny_study
  text = (out / 'summary.md').read_text()  # written with runs.csv, by the latest invocation
  rows = _rows(out / 'runs.csv')
  base = json.loads((out / 'base' / 'study_seconds.json').read_text())
  assert sorted(base) == ['margin_model', 'margins', 'prepare'] and min(base.values()) > 0
  for r in rows.values():
    saved = json.loads((out / 'runs' / r['run'] / 'study_seconds.json').read_text())
    assert float(r['seconds']) == saved['run'] > 0
    assert (r['autoattack_seconds'] != '') == (r['autoattack_acc'] != '')
  total = sum(base.values()) + sum(float(r['seconds']) for r in rows.values())
  total += sum(float(r['autoattack_seconds'] or 0) for r in rows.values())
  assert f'Wall time {total / 3600:.2f} h ({total:,.0f} s)' in text


def test_the_runs_share_one_margin_model_and_its_margins(tiny_study):
  out, _ = tiny_study
  base = json.loads((out / 'base' / 'margins' / 'stage.json').read_text())['outputs']
  run = out / 'runs' / 'puma_f0.3_s0'
  outputs = json.loads((run / 'margins' / 'stage.json').read_text())['outputs']
  assert outputs['model_fingerprint'] == base['model_fingerprint']
  assert not (run / 'margin_model' / 'checkpoints').exists()  # loaded, not trained
  config = json.loads((run / 'config.json').read_text())
  assert config['margin_model']['source'] == 'checkpoint'
  assert config['margin_model']['path'] == str(out / 'base' / 'margin_model')
  assert config['data']['data_dir'] == str(out / 'data')


def test_arms_without_their_config_field_are_listed_not_available(monkeypatch):
  arm = next(s for s in study.grid() if s.name == 'puma_f0.3_first_order')
  refresh = next(s for s in study.grid() if s.name == 'puma_f0.3_fab_refresh')
  # The config has both fields: every arm is available.
  assert study.missing_fields(arm) == [] and study.missing_fields(refresh) == []
  config = study.run_config(study.Options(workdir=study.Path('/w')), arm, 2)
  assert (config.margins.estimator, config.prune.fraction, config.seed) == ('first_order', 0.3, 2)
  # A config without the field (an older library) makes the arm unavailable.
  original = study.default_config

  def without_estimator(tiny):
    c = original(tiny)
    c.margins = ml_collections.ConfigDict({k: v for k, v in c.margins.items() if k != 'estimator'})
    return c

  monkeypatch.setattr(study, 'default_config', without_estimator)
  assert study.missing_fields(arm) == [study.ESTIMATOR_FIELD]
  assert study.missing_fields(refresh) == [study.ESTIMATOR_FIELD]


def test_the_full_grid_covers_the_study():
  names = [s.name for s in study.grid()]
  assert [f'puma_f{r:g}' for r in (0, 0.1, 0.2, 0.3, 0.4, 0.5)] == [
    n for n in names if n.startswith('puma_f') and '_' not in n[len('puma_f') :]
  ]
  assert {'at', 'random_f0.3', 'prune_low_f0.3', 'prune_high_f0.3'} <= set(names)
  estimator_arms = [n for n in names if n.startswith('puma_f0.3_')]
  assert len(estimator_arms) == 5  # 3 estimators x refresh on/off, less puma_f0.3 itself
  opts = study.Options(workdir=study.Path('/w'))
  assert opts.seeds == (0, 1, 2)
  # The FAB-refresh arm (about ten runs of training per refresh) runs only when asked for.
  assert 'puma_f0.3_fab_refresh' not in [s.name for s in opts.settings()]
  assert len(opts.settings()) == len(names) - 1
  with_fab = study.parse_args(['--workdir=/w', '--with_fab_refresh'])
  assert [s.name for s in with_fab.settings()] == names
  assert study.parse_args(['--workdir=/w']).autoattack_examples == study.AUTOATTACK_EXAMPLES
  refresh = next(s for s in study.grid() if s.name == 'puma_f0.3_deepfool_refresh')
  config = study.run_config(opts, refresh, 0)
  assert config.train.refresh_margins_every == config.train.num_steps // 2  # once, halfway
  short = study.run_config(study.Options(workdir=study.Path('/w'), train_steps=800), refresh, 0)
  assert short.train.refresh_margins_every == 400


def test_the_long_baseline_stretches_the_baselines_schedule_and_logs_its_curve():
  opts = study.Options(workdir=study.Path('/w'))
  by = {s.name: s for s in study.grid()}
  at, long = (study.run_config(opts, by[n], 0) for n in (study.BASELINE, study.LONG_BASELINE))
  assert long.prune.to_dict() == at.prune.to_dict()  # the same training set and eps
  assert long.train.num_steps == 2 * at.train.num_steps == 2 * study.TRAIN_STEPS
  assert long.train.warmup_steps == 2 * at.train.warmup_steps
  # Both first seeds log a curve point every TRAIN_STEPS / CURVE_POINTS steps; others don't.
  step = study.TRAIN_STEPS // study.CURVE_POINTS
  assert long.train.eval_every_steps == at.train.eval_every_steps == step
  later = study.run_config(opts, by[study.LONG_BASELINE], 1)
  assert later.train.eval_every_steps == later.train.num_steps
  # Every other run trains the study's steps.
  others = [s for s in study.grid() if s.name != study.LONG_BASELINE]
  assert {study.run_config(opts, s, 0).train.num_steps for s in others} == {study.TRAIN_STEPS}


def test_training_curves_plot_several_runs_and_skips_empty_ones(tmp_path):
  curve = {'step': [100, 200], 'clean_accuracy': [0.9, 0.92], 'pgd_accuracy': [0.3, 0.5]}
  empty = {'step': [], 'clean_accuracy': [], 'pgd_accuracy': []}
  report.plot_training_curves({'a': curve, 'b': curve, 'c': empty}, tmp_path / 'two.png')
  assert (tmp_path / 'two.png').read_bytes().startswith(b'\x89PNG')
  assert report.plot_training_curves({'c': empty}, tmp_path / 'none.png') is None
  assert not (tmp_path / 'none.png').exists()


def test_within_spread_compares_the_difference_with_its_standard_error():
  def setting(values):
    return {'values': {'m': values}}

  assert study_report.within_spread(setting([50.0, 52.0, 54.0]), setting([53.0, 55.0, 57.0]), 'm')
  assert not study_report.within_spread(
    setting([50.0, 51.0, 52.0]), setting([60.0, 61.0, 62.0]), 'm'
  )
  assert study_report.within_spread(setting([50.0]), setting([60.0, 61.0]), 'm') is None


def test_study_rerun_does_no_new_work(tiny_study, monkeypatch):
  out, text = tiny_study

  def must_not_run(*args, **kwargs):
    raise AssertionError('finished work ran again')

  monkeypatch.setattr(pipeline, 'RUNNERS', {name: must_not_run for name in pipeline.STAGES})
  monkeypatch.setattr(autoattack, 'run_standard', must_not_run)
  rerun = study.main([f'--workdir={out}', '--tiny'])

  def without_wall_time(t):  # the rerun's own (short) wall time is added to the total
    return [line for line in t.splitlines() if 'Wall time' not in line]

  assert without_wall_time(rerun) == without_wall_time(text) and 'Wall time' in rerun


@pytest.mark.parametrize(
  ('module', 'argv', 'flag'),
  [
    (study, ['--train_steps=0'], '--train_steps'),
    (study, ['--train_steps=x'], '--train_steps'),
    (margin_scaling, ['--sizes=400,200'], '--sizes'),
    (margin_scaling, ['--margin_model=/nonexistent'], '--margin_model'),
  ],
)
def test_bad_flags_are_refused_naming_the_flag(tmp_path, capsys, module, argv, flag):
  out_flag = '--workdir' if module is study else '--out'
  with pytest.raises(SystemExit):
    module.parse_args([f'{out_flag}={tmp_path}', *argv])
  assert flag in capsys.readouterr().err


def test_margin_scaling_scores_each_size_with_one_margin_model(tiny_study, tmp_path, monkeypatch):
  study_out, _ = tiny_study
  out = tmp_path / 'scaling'
  argv = [
    f'--out={out}',
    '--tiny',
    '--sizes=96,192',
    f'--margin_model={study_out}/base/margin_model',
  ]
  text = margin_scaling.main(argv)
  with open(out / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [int(r['examples']) for r in rows] == [96, 192]
  fingerprint = json.loads((study_out / 'base' / 'margins' / 'stage.json').read_text())['outputs'][
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


def test_report_only_reports_the_finished_runs_and_runs_nothing(tiny_study, tmp_path, monkeypatch):
  out, text = tiny_study

  def must_not_run(*args, **kwargs):
    raise AssertionError('--report_only ran a stage')

  monkeypatch.setattr(pipeline, 'RUNNERS', {name: must_not_run for name in pipeline.STAGES})
  monkeypatch.setattr(autoattack, 'run_standard', must_not_run)
  # A finished study: the same table, AutoAttack included.
  partial = study.main([f'--workdir={out}', '--tiny', '--report_only'])
  table = [line for line in text.splitlines() if line.startswith('|')]
  assert [line for line in partial.splitlines() if line.startswith('|')] == table
  n = len(_rows(out / 'runs.csv'))
  assert f'{n} of {n} runs finished.' in partial
  # It names the command that runs the study, not itself.
  assert f'Command: `python -m experiments.study --workdir={out} --tiny`' in partial
  # Nothing finished yet: every run is named, and nothing ran.
  empty = study.main([f'--workdir={tmp_path}', '--tiny', '--report_only'])
  assert f'0 of {n} runs finished; not yet: at_s0, puma_f0_s0' in empty
