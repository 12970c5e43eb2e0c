"""The margin stage in one process: devices, padding, resume, manifests, summary, estimate."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puma_jax import margin_report, margins, models, parallel
from puma_jax.attacks import deepfool
from puma_jax.datasets import sidecar, testing

SETTINGS = margins.DeepFoolSettings(norm='linf', num_candidates=4, max_iter=20)


def tiny_model(num_classes: int = 10, seed: int = 0):
  """A SmallCNN small enough for 4x4x1 images (conv4, pool, fc8, fc10) and random weights.

  The weights are drawn with NumPy (He-style scale, small biases) from the shapes Flax would
  initialise, which avoids compiling `init` op by op in every test process.
  """
  model = models.create(
    'small_cnn',
    num_classes=num_classes,
    conv_channels=(4,),
    pool_after=(True,),
    dense_widths=(8,),
  )
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if len(leaf.shape) == 1:  # biases
      return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

  return model, jax.tree.map(draw, shapes)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def splits(data_dir):
  """Real (3 shards) and generated (4 shards) splits of 4x4x1 images, 10 classes."""
  return {
    'real': testing.make_split(data_dir, num_examples=29, num_shards=3),
    'generated': testing.make_split(data_dir, num_examples=42, num_shards=4, source='generated'),
  }


def _direct(model, variables, split, settings):
  """DeepFool on the whole split in one batch, without the stage (the reference)."""
  images = np.stack([split.data_source[i]['image'] for i in range(split.num_examples)])
  x = images.astype(np.float32) / 255.0
  fn = jax.jit(
    lambda v, x, y: deepfool(
      lambda z: model.apply(v, z, train=False),
      x,
      y,
      norm=settings.norm,
      num_candidates=settings.num_candidates,
      overshoot=settings.overshoot,
      max_iter=settings.max_iter,
      clip=settings.clip,
    )
  )
  return fn(variables, x, split.labels())


def test_four_devices_match_one_device_and_compile_once(tmp_path, splits):
  model, variables = tiny_model()
  settings = margins.DeepFoolSettings(norm='l2', num_candidates=5, max_iter=15, overshoot=0.03)
  four = margins.compute_margins(
    model, variables, splits, settings=settings, batch_size=8, sidecar_root=tmp_path / 'four'
  )
  assert four.run['devices'] == 4
  # 7 shards of two splits, one batch shape: one compilation.
  assert four.run['compilations'] == 1
  assert four.run['shards_computed'] == {'real': [0, 1, 2], 'generated': [0, 1, 2, 3]}
  one = margins.compute_margins(
    model,
    variables,
    splits,
    settings=settings,
    batch_size=8,
    mesh=parallel.make_mesh(jax.devices()[:1]),
    sidecar_root=tmp_path / 'one',
  )
  assert one.run['devices'] == 1
  for key in splits:
    assert four.margins[key].shape == (splits[key].num_examples,)
    np.testing.assert_allclose(four.margins[key], one.margins[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(four.iterations[key], one.iterations[key])
    np.testing.assert_array_equal(four.converged[key], one.converged[key])
  # Not a trivial answer: margins of both signs, various iteration counts.
  allm = np.concatenate(list(four.margins.values()))
  assert (allm > 0).any() and (allm < 0).any() and len(np.unique(allm)) > 60


def test_partial_batches_give_one_margin_per_example(tmp_path, data_dir):
  split = testing.make_split(data_dir, num_examples=25, num_shards=2, name='odd_25')
  assert split.shard_lengths == (12, 13)  # batch 8: shards end with batches of 4 and 5 rows
  model, variables = tiny_model(seed=1)
  res = margins.compute_margins(
    model, variables, [split], settings=SETTINGS, batch_size=8, sidecar_root=tmp_path
  )
  assert res.run['examples_computed'] == 25
  ref = _direct(model, variables, split, SETTINGS)
  np.testing.assert_allclose(res.margins['real'], ref.margin, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(res.iterations['real'], ref.iterations)
  np.testing.assert_array_equal(res.converged['real'], ref.converged)
  assert len(np.unique(res.margins['real'])) >= 20  # the reference is not degenerate


def test_deepfool_batch_size_gives_the_margins_of_the_whole_batch(tmp_path, data_dir):
  split = testing.make_split(data_dir, num_examples=25, num_shards=2, name='odd_25')
  model, variables = tiny_model(seed=1)
  res = margins.compute_margins(
    model,
    variables,
    [split],
    settings=SETTINGS,
    batch_size=8,
    deepfool_batch_size=1,
    sidecar_root=tmp_path,
  )
  ref = _direct(model, variables, split, SETTINGS)
  np.testing.assert_allclose(res.margins['real'], ref.margin, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(res.iterations['real'], ref.iterations)
  assert len(np.unique(ref.iterations)) > 1  # examples leave their slots at different times
  with pytest.raises(ValueError, match='margins.deepfool_batch_size'):
    margins.compute_margins(
      model,
      variables,
      [split],
      settings=SETTINGS,
      batch_size=8,
      deepfool_batch_size=-1,
      sidecar_root=tmp_path,
    )


def test_resume_skips_complete_shards_and_redoes_corrupt_ones(tmp_path, splits):
  model, variables = tiny_model(seed=2)
  first = margins.compute_margins(
    model, variables, splits, settings=SETTINGS, batch_size=8, sidecar_root=tmp_path
  )
  split = splits['generated']
  tags = margins.sidecar_tags('margins')
  truncated = sidecar.sidecar_path(split, tags['margin'], 1, tmp_path)
  truncated.write_bytes(truncated.read_bytes()[:-4])
  garbage = sidecar.sidecar_path(split, tags['iterations'], 3, tmp_path)
  garbage.write_bytes(b'not an npy file')
  leftover = truncated.with_name(f'.{truncated.stem}.tmp-123-abc.npy')  # a killed writer's temp
  leftover.write_bytes(b'partial')
  with pytest.raises(sidecar.SidecarError, match=truncated.name):
    sidecar.load(split, 'margins', first.settings, tmp_path)
  damaged = sidecar.sidecar_path(splits['real'], tags['converged'], 2, tmp_path)
  data = bytearray(damaged.read_bytes())
  data[-1] ^= 1  # complete and well-formed, but not what was written
  damaged.write_bytes(bytes(data))

  again = margins.compute_margins(
    model, variables, splits, settings=SETTINGS, batch_size=8, sidecar_root=tmp_path
  )
  assert again.run['shards_computed'] == {'real': [2], 'generated': [1, 3]}
  assert again.run['shards_skipped'] == {'real': [0, 1], 'generated': [0, 2]}
  assert not leftover.exists()
  for key in splits:  # bitwise identical to the uninterrupted run
    np.testing.assert_array_equal(again.margins[key], first.margins[key])
    np.testing.assert_array_equal(again.iterations[key], first.iterations[key])
    np.testing.assert_array_equal(again.converged[key], first.converged[key])
    for q, t in tags.items():  # natural dtypes, and the sidecars hold what was returned
      stored = sidecar.load(splits[key], t, root=tmp_path)
      assert stored.dtype == margins.DTYPES[q]
      np.testing.assert_array_equal(stored, getattr(again, {'margin': 'margins'}.get(q, q))[key])

  third = margins.compute_margins(
    model, variables, splits, settings=SETTINGS, batch_size=8, sidecar_root=tmp_path
  )
  assert third.run['shards_computed'] == {'real': [], 'generated': []}
  assert third.run['compilations'] == 0
  loaded = margins.load_margins(model, variables, splits, settings=SETTINGS, sidecar_root=tmp_path)
  np.testing.assert_array_equal(loaded['generated'], first.margins['generated'])
  with pytest.raises(sidecar.SidecarError, match='max_iter'):
    margins.load_margins(
      model,
      variables,
      splits,
      settings=margins.DeepFoolSettings(norm='linf', num_candidates=4, max_iter=21),
      sidecar_root=tmp_path,
    )


def test_mismatching_manifest_is_refused_unless_recompute(tmp_path, splits):
  model, variables = tiny_model(seed=3)
  only = {'real': splits['real']}
  kw = dict(batch_size=8, sidecar_root=tmp_path)
  margins.compute_margins(model, variables, only, settings=SETTINGS, **kw)

  other = margins.DeepFoolSettings(norm='linf', num_candidates=4, max_iter=3)
  with pytest.raises(
    sidecar.SidecarError, match=r'(?s)deepfool\.max_iter: 20 -> 3.*recompute=True'
  ):
    margins.compute_margins(model, variables, only, settings=other, **kw)
  _, other_variables = tiny_model(seed=4)
  with pytest.raises(sidecar.SidecarError, match='model_fingerprint'):
    margins.compute_margins(model, other_variables, only, settings=SETTINGS, **kw)
  wider, wider_variables = tiny_model(seed=3)
  wider = wider.clone(mean=(0.5,))  # same weights, other normalisation
  with pytest.raises(sidecar.SidecarError, match=r'model\.fields\.mean'):
    margins.compute_margins(wider, wider_variables, only, settings=SETTINGS, **kw)

  redone = margins.compute_margins(model, variables, only, settings=other, recompute=True, **kw)
  assert redone.run['shards_computed'] == {'real': [0, 1, 2]}
  fresh = margins.compute_margins(
    model, variables, only, settings=other, batch_size=8, sidecar_root=tmp_path / 'fresh'
  )
  np.testing.assert_array_equal(redone.margins['real'], fresh.margins['real'])
  assert redone.iterations['real'].max() <= 3

  # A manifest of another dataset (labels differ) is refused too.
  path = sidecar.manifest_path(splits['real'], 'margins', tmp_path)
  manifest = json.loads(path.read_text())
  manifest['labels_fingerprint'] = 'sha256:0'
  path.write_text(json.dumps(manifest))
  with pytest.raises(sidecar.SidecarError, match='labels'):
    margins.compute_margins(model, variables, only, settings=other, **kw)


def test_summary_json_and_histogram(tmp_path, splits, caplog):
  model, variables = tiny_model(seed=5)
  with caplog.at_level(logging.INFO):
    res = margins.compute_margins(
      model,
      variables,
      splits,
      settings=SETTINGS,
      batch_size=8,
      sidecar_root=tmp_path / 'side',
      summary_dir=tmp_path / 'out',
      progress_every_s=0.0,
    )
  progress = [r.getMessage() for r in caplog.records if 'examples/s' in r.getMessage()]
  assert progress and 'not converged:' in progress[-1] and '71/71 examples' in progress[-1]

  summary = json.loads((tmp_path / 'out' / margin_report.SUMMARY_FILE).read_text())
  png = (tmp_path / 'out' / margin_report.HISTOGRAM_FILE).read_bytes()
  assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 5000
  assert summary['settings'] == res.settings
  assert summary['settings']['deepfool'] == SETTINGS.as_dict()
  for key, split in splits.items():
    m, conv = res.margins[key], res.converged[key]
    s = summary['by_source'][key]
    assert s['count'] == split.num_examples
    assert s['fraction_negative'] == pytest.approx(np.mean(m < 0))
    assert s['fraction_not_converged'] == pytest.approx(np.mean(~conv))
    assert s['quantiles']['0.5'] == pytest.approx(np.median(m))
    assert s['quantiles']['0.9'] == pytest.approx(np.quantile(m, 0.9))
    assert s['iterations']['max'] == res.iterations[key].max()
    labels = split.labels()
    by_class = s['by_class']
    assert by_class['count'] == np.bincount(labels, minlength=10).tolist()
    for c in (0, 7):
      assert by_class['q0.5'][c] == pytest.approx(np.median(m[labels == c]))
      assert by_class['q0.1'][c] == pytest.approx(np.quantile(m[labels == c], 0.1))
      assert by_class['mean'][c] == pytest.approx(np.mean(m[labels == c]))
      assert by_class['fraction_negative'][c] == pytest.approx(np.mean(m[labels == c] < 0))
  assert summary['overall']['count'] == 71


def test_per_class_handles_empty_classes_and_infinities():
  m = np.array([1.0, -2.0, np.inf, 3.0, 0.5])
  labels = np.array([0, 0, 2, 2, 2])
  out = margin_report.per_class(m, np.ones(5, bool), labels, num_classes=4)
  assert out['count'] == [2, 0, 3, 0]
  assert out['q0.5'][0] == pytest.approx(-0.5) and out['q0.5'][1] is None
  assert out['q0.5'][2] == 3.0  # the middle of [0.5, 3, inf] (np.quantile says nan)
  assert out['q0.9'][2] == np.inf and out['mean'][3] is None


def test_model_fingerprint_sees_values_names_and_dtypes():
  _, v = tiny_model(seed=0)
  base = margins.model_fingerprint(v)
  assert base.startswith('sha256:') and base == margins.model_fingerprint(jax.tree.map(np.array, v))
  changed = jax.tree.map(np.array, v)
  changed['params']['fc2']['bias'][3] += 1e-7
  assert margins.model_fingerprint(changed) != base
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), v)
  assert margins.model_fingerprint(bf16) != base
  renamed = {'params': {('x' + k): w for k, w in v['params'].items()}}
  assert margins.model_fingerprint(renamed) != base


def test_cost_estimate(splits, tmp_path):
  model, variables = tiny_model(seed=6)
  est = margins.estimate_margin_cost(
    model,
    variables,
    settings=SETTINGS,
    batch_size=8,
    splits=splits,
    num_devices=64,
    price_per_device_hour=2.5,
    probe_batches=2,
  )
  assert est.num_examples == 71 and est.probe_devices == 4 and est.probe_data == 'dataset'
  rate = est.examples_per_second_per_device
  assert rate > 0 and 1 <= est.mean_iterations <= SETTINGS.max_iter
  assert est.device_hours() == pytest.approx(71 / rate / 3600)
  assert est.hours() == pytest.approx(est.device_hours() / 64)
  assert est.cost(10**7) == pytest.approx(10**7 / rate / 3600 * 2.5)
  table = est.table()
  assert '| examples | devices |' in table and '| 71 | 64 |' in table
  assert 'cost at 2.5/device-hour' in table
  random_probe = margins.estimate_margin_cost(
    model,
    variables,
    settings=SETTINGS,
    batch_size=8,
    image_shape=(4, 4, 1),
    num_examples=10**6,
    probe_batches=1,
  )
  assert random_probe.probe_data == 'random' and random_probe.num_devices == jax.device_count()
  margins.write_estimate(est, tmp_path / 'estimate.json')
  saved = json.loads((tmp_path / 'estimate.json').read_text())
  assert saved['device_hours'] == pytest.approx(est.device_hours()) and saved['num_devices'] == 64

  from configs import default

  c = default.get_config().margins
  c.batch_size, c.max_iter = 8, 5
  c.estimate.num_examples, c.estimate.num_devices, c.estimate.probe_batches = 1000, 2, 1
  from_config = margins.estimate_from_config(c, model, variables, splits)
  assert from_config.settings.max_iter == 5 and from_config.num_examples == 1000
  assert from_config.num_devices == 2 and from_config.price_per_device_hour == 0.0
  assert 'cost' not in from_config.table()
  with pytest.raises(ValueError, match='price'):
    margins.estimate_margin_cost(
      model, variables, settings=SETTINGS, batch_size=8, splits=splits, price_per_device_hour=-1
    )
  with pytest.raises(ValueError, match='num_examples'):
    margins.estimate_margin_cost(
      model, variables, settings=SETTINGS, batch_size=8, image_shape=(4, 4, 1)
    )


def test_bad_input_is_named(tmp_path, splits):
  model, variables = tiny_model()
  with pytest.raises(ValueError, match=r'margins\.batch_size=6.*4 local devices'):
    margins.compute_margins(model, variables, splits, settings=SETTINGS, batch_size=6)
  model3, variables3 = tiny_model(num_classes=3)
  with pytest.raises(ValueError, match='3 outputs|10 classes'):
    margins.compute_margins(model3, variables3, splits, settings=SETTINGS, batch_size=8)
  with pytest.raises(ValueError, match='margins.norm'):
    margins.DeepFoolSettings(norm='l1')
  with pytest.raises(ValueError, match='num_candidates'):
    margins.DeepFoolSettings(num_candidates=1)
  with pytest.raises(ValueError, match='same split'):
    margins.compute_margins(
      model, variables, {'a': splits['real'], 'b': splits['real']}, settings=SETTINGS, batch_size=8
    )
  # Sidecars without a manifest hold unknown values: refused.
  path = sidecar.sidecar_path(splits['real'], 'margins', 0, tmp_path)
  path.parent.mkdir(parents=True)
  np.save(path, np.zeros(10, np.float32))
  with pytest.raises(sidecar.SidecarError, match='without a manifest'):
    margins.compute_margins(
      model, variables, splits, settings=SETTINGS, batch_size=8, sidecar_root=tmp_path
    )


def test_settings_from_config():
  from configs import default

  c = default.get_config()
  s = margins.settings_from_config(c.margins)
  assert s == margins.DeepFoolSettings(
    norm='linf', num_candidates=10, overshoot=0.02, max_iter=50, clip=(0.0, 1.0)
  )
  c.margins.clip = False
  assert margins.settings_from_config(c.margins).clip is None


ESTIMATOR_SETTINGS = {
  'first_order': margins.EstimatorSettings('first_order', norm='l2', num_candidates=5),
  'fab': margins.EstimatorSettings(
    'fab', norm='linf', num_candidates=4, options=(('num_steps', 4), ('restarts', 2))
  ),
}


@pytest.mark.parametrize('name', sorted(ESTIMATOR_SETTINGS))
def test_each_estimator_in_the_engine_equals_the_pure_function(tmp_path, splits, name):
  from puma_jax.attacks import margin_estimators

  model, variables = tiny_model(seed=6)
  settings = ESTIMATOR_SETTINGS[name]
  res = margins.compute_margins(
    model,
    variables,
    splits,
    settings=settings,
    batch_size=8,
    deepfool_batch_size=1,  # chunks of one row per device
    sidecar_root=tmp_path,
  )
  assert res.summary['estimator'] == name and res.summary['tag'] == f'margins_{name}'
  assert res.settings[name] == settings.as_dict() and 'deepfool' not in res.settings
  for key, split in splits.items():
    images = np.stack([split.data_source[i]['image'] for i in range(split.num_examples)])
    direct = jax.jit(
      lambda v, x, y: margin_estimators.ESTIMATORS[name](
        lambda z: model.apply(v, z, train=False),
        x,
        y,
        norm=settings.norm,
        num_candidates=settings.num_candidates,
        clip=settings.clip,
        **settings.options_dict(),
      )
    )(variables, images.astype(np.float32) / 255.0, split.labels())
    np.testing.assert_allclose(res.margins[key], direct.margin, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.iterations[key], direct.iterations)
    np.testing.assert_array_equal(res.converged[key], direct.converged)
    # What was stored is what was returned, under the estimator's tag.
    stored = sidecar.load(split, f'margins_{name}', res.settings, tmp_path)
    np.testing.assert_array_equal(stored, res.margins[key])
  assert not sidecar.manifest_path(splits['real'], 'margins', tmp_path).exists()


def test_each_estimator_resumes_under_its_own_tag(tmp_path, splits):
  model, variables = tiny_model(seed=7)
  first_order = ESTIMATOR_SETTINGS['first_order']
  kw = dict(batch_size=8, sidecar_root=tmp_path)
  df = margins.compute_margins(model, variables, splits, settings=SETTINGS, **kw)
  fo = margins.compute_margins(model, variables, splits, settings=first_order, **kw)
  assert fo.run['shards_computed'] == {'real': [0, 1, 2], 'generated': [0, 1, 2, 3]}
  assert not np.array_equal(df.margins['real'], fo.margins['real'])
  # A damaged first_order shard is recomputed alone; DeepFool's sidecars are untouched.
  split = splits['generated']
  damaged = sidecar.sidecar_path(split, 'margins_first_order', 2, tmp_path)
  damaged.write_bytes(damaged.read_bytes()[:-4])
  deepfool_files = {p: p.read_bytes() for p in tmp_path.rglob('*.margins.npy')}
  again = margins.compute_margins(model, variables, splits, settings=first_order, **kw)
  assert again.run['shards_computed'] == {'real': [], 'generated': [2]}
  assert {p: p.read_bytes() for p in tmp_path.rglob('*.margins.npy')} == deepfool_files
  for key in splits:
    np.testing.assert_array_equal(again.margins[key], fo.margins[key])
  rerun = margins.compute_margins(model, variables, splits, settings=SETTINGS, **kw)
  assert rerun.run['shards_computed'] == {'real': [], 'generated': []}
  # Each loads from its own tag, checked against its own settings.
  for settings, expected in ((SETTINGS, df), (first_order, fo)):
    loaded = margins.load_margins(
      model, variables, splits, settings=settings, **{'sidecar_root': tmp_path}
    )
    np.testing.assert_array_equal(loaded['generated'], expected.margins['generated'])
  other = margins.EstimatorSettings('first_order', norm='l2', num_candidates=4)
  with pytest.raises(sidecar.SidecarError, match=r'first_order\.num_candidates: 5 -> 4'):
    margins.compute_margins(model, variables, splits, settings=other, **kw)


def test_estimator_settings_from_config():
  from configs import default

  c = default.get_config()
  assert margins.settings_from_config(c.margins) == margins.DeepFoolSettings()
  assert margins.default_tag('deepfool') == 'margins'
  c.margins.estimator = 'fab'
  c.margins.fab.restarts = 3
  s = margins.settings_from_config(c.margins)
  assert s.estimator == 'fab' and s.options_dict()['restarts'] == 3
  assert margins.default_tag(s.estimator) == 'margins_fab'
  with pytest.raises(ValueError, match='unknown'):
    margins.EstimatorSettings('first_order', options=(('max_iter', 3),))
  with pytest.raises(ValueError, match='not a margin estimator'):
    margins.default_tag('newton')
