"""The main job end to end on every config's `:tiny` variant, resume, and config checks."""

import importlib
import json
import re
import shutil

import numpy as np
import pytest
from absl import app
from PIL import Image

from puma_jax import artifacts, margins, model_io, models, pipeline, stages, train
from puma_jax.datasets import cifar, sidecar
from tools import image_folder

STAGE_DIRS = ('prepare', 'margin_model', 'margins', 'prune', 'train', 'evaluate', 'report')


def _config(name, arg='tiny'):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def _check_complete_run(workdir, config, num_test=None):
  for name in STAGE_DIRS:
    if name in ('margin_model', 'margins') and config.prune.strategy in ('none', 'random'):
      continue
    assert (workdir / name / 'stage.json').exists(), name
  report = json.loads((workdir / 'report.json').read_text())
  ev = report['evaluation_report']
  assert ev['n_examples'] == (num_test or config.eval.num_examples)
  assert 0.0 <= ev['worst_case_acc'] <= ev['clean_acc'] <= 100.0
  assert json.loads((workdir / 'config.json').read_text())['prune'] == dict(config.prune)
  assert '## Evaluation' in (workdir / 'report.md').read_text()
  return report


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
  """The default config's tiny variant, run once for the tests that inspect it."""
  workdir = tmp_path_factory.mktemp('default')
  config = _config('default')
  pipeline.run(config, workdir)
  return config, workdir


def test_default_tiny_runs_every_stage(default_run):
  config, workdir = default_run
  report = _check_complete_run(workdir, config)
  kept = report['pruning']['kept']
  assert kept['generated'] == round(0.7 * config.data.generated.num_examples)
  assert kept['real'] == 4000
  for png in ('eps_distribution.png', 'training_curves.png', 'margins/margins_by_source.png'):
    assert (workdir / png).stat().st_size > 1000, png


def test_rerun_after_completion_does_no_work(default_run, monkeypatch):
  config, workdir = default_run

  def must_not_run(ctx):
    raise AssertionError('a complete stage ran again')

  monkeypatch.setattr(pipeline, 'RUNNERS', {name: must_not_run for name in pipeline.STAGES})
  pipeline.run(config, workdir)


def test_prune_reads_the_recorded_margins_without_restoring_the_margin_model(
  default_run, monkeypatch, tmp_path
):
  config, done = default_run
  workdir = tmp_path / 'copy'
  _copy_up_to_margins(done, workdir)

  def must_not_run(*args, **kwargs):
    raise AssertionError('the margin model was restored or hashed again')

  monkeypatch.setattr(model_io, 'restore_ema_variables', must_not_run)
  monkeypatch.setattr(artifacts, 'tree_fingerprint', must_not_run)
  pipeline.run(config, workdir, stage='prune')
  assert (workdir / 'prune' / 'kept.npz').read_bytes() == (done / 'prune' / 'kept.npz').read_bytes()


def _copy_up_to_margins(done, workdir):
  shutil.copytree(done, workdir)
  for name in ('prune', 'train', 'evaluate', 'report'):
    shutil.rmtree(workdir / name, ignore_errors=True)
  return sorted(workdir.glob('**/*.margins.npy'))


def test_a_damaged_margin_sidecar_is_recomputed_or_named(default_run, tmp_path, monkeypatch):
  config, done = default_run
  workdir = tmp_path / 'copy'
  path = _copy_up_to_margins(done, workdir)[-1]
  good = path.read_bytes()
  data = bytearray(good)
  data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zeroed bytes in the values
  path.write_bytes(bytes(data))

  write_bytes, data_folder = artifacts.write_bytes, path.parent

  def read_only(target, data):  # the data folder is read-only (the workdir is not)
    if target.parent == data_folder:
      raise PermissionError(30, 'Read-only file system')
    return write_bytes(target, data)

  with monkeypatch.context() as m:
    m.setattr(artifacts, 'write_bytes', read_only)
    shard = re.escape(path.name.split('.margins')[0])
    with pytest.raises(sidecar.SidecarError, match=f'{shard}.*Read-only.*sidecar_dir'):
      pipeline.run(config, workdir, stage='prune')
  pipeline.run(config, workdir, stage='prune')
  assert path.read_bytes() == good
  assert (workdir / 'prune' / 'kept.npz').read_bytes() == (done / 'prune' / 'kept.npz').read_bytes()


def test_a_changed_setting_is_refused_with_a_way_forward(default_run):
  config, workdir = default_run
  changed = _config('default')
  changed.prune.fraction = 0.5
  with pytest.raises(stages.ConfigMismatchError) as e:
    pipeline.run(changed, workdir)
  assert 'prune.fraction: 0.3 -> 0.5' in str(e.value)
  assert '--workdir' in str(e.value) and 'delete' in str(e.value)
  # Fields that do not change results (logging, batch sizes of margins) are free.
  relaxed = _config('default')
  relaxed.train.log_every_steps = 7
  relaxed.margins.batch_size = 32
  pipeline.run(relaxed, workdir, stage='report')


def test_one_stage_needs_its_inputs(tmp_path):
  with pytest.raises(app.UsageError, match='run it first'):
    pipeline.run(_config('default'), tmp_path, stage='train')


def test_autoattack_with_too_few_classes_is_refused_before_any_work(tmp_path):
  config = _config('default')
  config.model.num_classes = 3
  with pytest.raises(ValueError, match='eval.autoattack=none'):
    pipeline.run(config, tmp_path)
  assert not (tmp_path / 'prepare').exists()


def test_margin_model_from_a_pytorch_state_dict(tmp_path):
  from test_models_peer import _cnn_state_dict  # random weights in PyTorch's layout

  config = _config('default')
  weights = tmp_path / 'released.npz'
  # The default small CNN: convs (16, 32) on 28x28x1, each pooled (7x7 left), dense 128.
  np.savez(weights, **_cnn_state_dict(np.random.RandomState(0), 1, (16, 32), (128,), 7))
  config.margin_model.source = 'torch_npz'
  config.margin_model.path = str(weights)
  workdir = tmp_path / 'w'
  for stage in ('prepare', 'margin_model', 'margins'):
    pipeline.run(config, workdir, stage=stage)

  expected = margins.model_fingerprint(models.import_torch_state_dict('small_cnn', str(weights)))
  for stage in ('margin_model', 'margins'):
    outputs = json.loads((workdir / stage / 'stage.json').read_text())['outputs']
    assert outputs['model_fingerprint'] == expected, stage
  assert not (workdir / 'margin_model' / 'checkpoints').exists()  # loaded, not trained
  prepared = json.loads((workdir / 'prepare' / 'stage.json').read_text())['outputs']
  n = prepared['real']['examples'] + prepared['generated']['examples']
  assert json.loads((workdir / 'margins' / 'stage.json').read_text())['outputs']['examples'] == n


class _Interrupt(Exception):
  pass


def test_train_stage_interrupted_resumes_from_its_checkpoint(default_run, tmp_path, monkeypatch):
  config, done_workdir = default_run
  workdir = tmp_path / 'w'
  # Start from the finished run's data and earlier stages, so only training reruns.
  pipeline.run(config, workdir, stage='prepare')
  original = train.train_and_evaluate

  def stop_after_checkpoint(step, state):
    if step == config.train.checkpoint_every_steps:
      raise _Interrupt

  def train_stage_stops(cfg, run_dir, **kwargs):
    if run_dir.name == 'train':  # Not the margin model's run.
      kwargs['on_step'] = stop_after_checkpoint
    return original(cfg, run_dir, **kwargs)

  monkeypatch.setattr(train, 'train_and_evaluate', train_stage_stops)
  with pytest.raises(_Interrupt):
    pipeline.run(config, workdir)
  assert not (workdir / 'train' / 'stage.json').exists()
  ckpts = sorted(p.name for p in (workdir / 'train' / 'checkpoints').iterdir() if p.name.isdigit())
  assert ckpts == [str(config.train.checkpoint_every_steps)]

  monkeypatch.setattr(train, 'train_and_evaluate', original)
  pipeline.run(config, workdir)
  _check_complete_run(workdir, config)
  steps = [row['step'] for row in map(json.loads, (workdir / 'train' / 'metrics.jsonl').open())]
  assert steps == sorted(steps) and steps[-1] == config.train.num_steps
  # The resumed run ends where the uninterrupted one did.
  a = json.loads((done_workdir / 'train' / 'stage.json').read_text())['outputs']
  b = json.loads((workdir / 'train' / 'stage.json').read_text())['outputs']
  assert a == b


def _cifar_tiny(tmp_path, monkeypatch):
  from test_datasets_cifar import make_archive  # The tests' fake archive writer.

  expected = make_archive(tmp_path / 'archives', 'cifar10')
  monkeypatch.setitem(cifar.EXPECTED_OVERRIDE, 'cifar10', expected['checksum'])
  rng = np.random.default_rng(0)
  npz = tmp_path / '1m.npz'
  np.savez(
    npz,
    image=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
    label=rng.integers(0, 10, 64),
  )
  config = _config('cifar10_wrn28_10', 'puma,tiny')
  config.data.real.archive_dir = str(tmp_path / 'archives')
  config.data.generated.path = str(npz)
  return config


def test_cifar_recipe_tiny_end_to_end(tmp_path, monkeypatch):
  config = _cifar_tiny(tmp_path, monkeypatch)
  pipeline.run(config, tmp_path / 'w')
  # The fake archive has 3 test images; 30% of the 64 generated ones are pruned.
  report = _check_complete_run(tmp_path / 'w', config, num_test=3)
  assert report['pruning']['kept']['generated'] == 45


def test_imagenet_tiny_end_to_end(tmp_path):
  rng = np.random.default_rng(0)
  src = tmp_path / 'src'
  for c in ('n001', 'n002', 'n003', 'n004'):
    (src / c).mkdir(parents=True)
    for i in range(14):
      Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
        src / c / f'{c}_{i}.JPEG'
      )
  config = _config('imagenet21k')
  settings = image_folder.Settings(resolution=16, test_per_class=4, train_shards=2, test_shards=1)
  image_folder.convert(src, tmp_path / 'tfds', config.data.real.name, settings, workers=0)
  config.data.data_dir = str(tmp_path / 'tfds')
  config.eval.num_examples = 16
  pipeline.run(config, tmp_path / 'w')
  _check_complete_run(tmp_path / 'w', config)


def test_first_order_margins_end_to_end_under_their_own_tag(default_run, tmp_path):
  from puma_jax import datasets, pruning

  config, done = default_run
  workdir = tmp_path / 'first_order'
  _copy_up_to_margins(done, workdir)
  shutil.rmtree(workdir / 'margins')
  config = _config('default')
  config.margins.estimator = 'first_order'
  config.eval.autoattack = 'none'
  pipeline.run(config, workdir)
  report = _check_complete_run(workdir, config)

  marker = json.loads((workdir / 'margins' / 'stage.json').read_text())
  assert marker['fields']['margins.estimator'] == 'first_order'
  assert 'margins.max_iter' not in marker['fields']
  assert marker['outputs']['tag'] == 'margins_first_order'
  assert report['margin_estimator'] == 'first_order'
  assert 'estimator `first_order`' in (workdir / 'report.md').read_text()
  # DeepFool's sidecars are still there, beside the first_order ones.
  data = workdir / 'data'
  assert sorted(data.glob('**/*.margins_first_order.npy'))
  assert sorted(data.glob('**/*.margins.npy'))
  # The prune stage ranked the first_order margins (read back from their own tag).
  prepared = datasets.prepare(config.data, data)
  model, variables = model_io.restore_ema_variables(config.model, workdir / 'margin_model')
  loaded = margins.load_margins(
    model, variables, prepared.train_splits, settings=margins.settings_from_config(config.margins)
  )
  expected = pruning.select(
    pruning.settings_from_config(config),
    labels={k: s.labels() for k, s in prepared.train_splits.items()},
    margins=loaded,
    num_classes=config.model.num_classes,
  )
  kept = pruning.PruneResult.load(workdir / 'prune')
  deepfool = pruning.PruneResult.load(done / 'prune')
  for source in kept.kept:
    np.testing.assert_array_equal(kept.kept[source], expected.kept[source])
    np.testing.assert_array_equal(kept.eps[source], expected.eps[source])
  assert not np.array_equal(kept.eps['generated'], deepfool.eps['generated'])


def test_estimator_and_refresh_choices_are_checked_before_any_work(tmp_path):
  from puma_jax import config_base

  cases = [
    ({'margins.estimator': 'newton'}, 'not a margin estimator'),
    ({'margins.estimator': 'fab', 'margins.clip': False}, 'needs margins.clip=True'),
    ({'train.refresh_margins_every': 5, 'prune.strategy': 'random'}, 'constant eps'),
    ({'train.refresh_margins_every': -1}, 'integer >= 0'),
  ]
  for overrides, message in cases:
    config = _config('default')
    for field, value in overrides.items():
      group, name = field.split('.')
      setattr(config[group], name, value)
    with pytest.raises(config_base.ConfigError, match=message):
      pipeline.run(config, tmp_path / 'w')
    assert not (tmp_path / 'w').exists() or not any((tmp_path / 'w').iterdir())


def test_stage_fingerprints_of_deepfool_and_no_refresh_are_unchanged():
  # The fields the margin and train stages recorded before estimators and refresh existed.
  config = _config('default')
  old_margins = stages.Stage(
    'margins',
    (
      'margins.norm',
      'margins.num_candidates',
      'margins.overshoot',
      'margins.max_iter',
      'margins.clip',
    ),
  )
  old_train = stages.Stage('train', pipeline._TRAIN_FIELDS)
  up = {'prepare': 'p', 'margin_model': 'm'}
  fp = {
    name: pipeline.STAGE_DEFS[name].expected(config, up)['fingerprint']
    for name in ('margins', 'train')
  }
  assert fp['margins'] == old_margins.expected(config, up)['fingerprint']
  assert fp['train'] == old_train.expected(config, up)['fingerprint']
  for field, value in (('estimator', 'first_order'), ('estimator', 'fab')):
    changed = _config('default')
    changed.margins[field] = value
    assert pipeline.STAGE_DEFS['margins'].expected(changed, up)['fingerprint'] != fp['margins']
  fab = _config('default')
  fab.margins.estimator = 'fab'
  fab_more = _config('default')
  fab_more.margins.estimator = 'fab'
  fab_more.margins.fab.restarts = 3
  assert (
    pipeline.STAGE_DEFS['margins'].expected(fab, up)['fingerprint']
    != pipeline.STAGE_DEFS['margins'].expected(fab_more, up)['fingerprint']
  )
  refreshed = _config('default')
  refreshed.train.refresh_margins_every = 100
  assert pipeline.STAGE_DEFS['train'].expected(refreshed, up)['fingerprint'] != fp['train']


def test_bench_refresh_times_a_refresh_and_a_train_step(default_run):
  from experiments import bench_refresh

  _, workdir = default_run
  out = bench_refresh.main(
    ['--workdir', str(workdir), '--num_examples', '64', '--train_steps', '1']
  )
  assert out['estimator'] == 'deepfool' and out['projected']
  assert 60 <= out['timed_examples'] <= 68 < out['kept_examples']
  assert out['refresh_seconds_timed'] > 0 and out['train_step_seconds'] > 0
