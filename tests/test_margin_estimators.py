"""Margin estimators: exact margins of affine classifiers, signs, independence, config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puma_jax import config_base, parallel
from puma_jax.attacks import fab_margin, margin_estimators
from puma_jax.attacks.deepfool import deepfool
from puma_jax.attacks.margin_estimators import ESTIMATORS
from tests import attack_models

DUAL = {'l2': 2, 'linf': 1}
FAB = dict(num_steps=30, restarts=2)


def _affine(num_classes, dim, seed, scale=1.0):
  rs = np.random.RandomState(seed)
  w = (scale * rs.randn(dim, num_classes)).astype(np.float32)
  b = (rs.randn(num_classes) * 0.1).astype(np.float32)
  return w, b, attack_models.affine(w, b)


def _exact(w, b, x, y, norm):
  """Signed exact distance (float64) to the label's region boundary, correct rows only."""
  w, b, x = w.astype(np.float64), b.astype(np.float64), x.reshape(len(x), -1).astype(np.float64)
  f = x @ w + b
  return np.array(
    [
      min(
        (f[i, yi] - f[i, k]) / np.linalg.norm(w[:, yi] - w[:, k], DUAL[norm])
        for k in range(w.shape[1])
        if k != yi
      )
      for i, yi in enumerate(y)
    ]
  )


def _estimate(name, logits_fn, x, y, norm, num_candidates, clip=None, **kw):
  fn = functools.partial(
    ESTIMATORS[name], logits_fn, norm=norm, num_candidates=num_candidates, clip=clip, **kw
  )
  return jax.jit(fn)(x, y)


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_first_order_and_deepfool_are_exact_for_affine_models(norm):
  w, b, logits_fn = _affine(7, 12, seed=1)
  x = np.random.RandomState(2).rand(16, 12).astype(np.float32)
  y = np.argmax(np.asarray(logits_fn(x)), axis=1)
  expected = _exact(w, b, x, y, norm)
  for name in ('first_order', 'deepfool'):
    res = _estimate(name, logits_fn, x, y, norm, num_candidates=7)
    np.testing.assert_allclose(res.margin, expected, rtol=1e-4, err_msg=name)
    assert res.converged.all() and (np.asarray(res.iterations) == 1).all(), name


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_misclassified_margins_are_minus_the_exact_distance(norm):
  w, b, logits_fn = _affine(6, 10, seed=3, scale=0.3)
  x = np.random.RandomState(4).uniform(0.4, 0.6, (12, 10)).astype(np.float32)
  f = np.asarray(logits_fn(x))
  order = np.argsort(-f, axis=1)
  y, top = order[:, 1], order[:, 0]  # exactly one class (top) scores above y
  rows = np.arange(12)
  expected = -(f[rows, top] - f[rows, y]) / np.linalg.norm(w[:, top] - w[:, y], DUAL[norm], axis=0)
  assert np.abs(expected).max() < 0.35  # every coordinate moves < 0.4: the box does not bind
  for name in ('first_order', 'deepfool'):
    res = _estimate(name, logits_fn, x, y, norm, num_candidates=6)
    np.testing.assert_allclose(res.margin, expected, rtol=1e-4, err_msg=name)
  res = _estimate('fab', logits_fn, x, y, norm, num_candidates=6, clip=(0.0, 1.0), **FAB)
  assert res.converged.all() and (np.asarray(res.margin) < 0).all()
  np.testing.assert_allclose(res.margin, expected, rtol=0.02)
  assert (np.asarray(res.margin) <= expected * (1 - 1e-5)).all()  # never shorter than exact


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_fab_is_close_to_the_exact_distance_and_an_upper_bound(norm):
  w, b, logits_fn = _affine(5, 10, seed=5, scale=0.3)
  x = np.random.RandomState(6).uniform(0.4, 0.6, (16, 10)).astype(np.float32)
  y = np.argmax(np.asarray(logits_fn(x)), axis=1)
  expected = _exact(w, b, x, y, norm)
  assert expected.max() < 0.35  # every coordinate moves < 0.4: the box does not bind
  res = _estimate('fab', logits_fn, x, y, norm, num_candidates=5, clip=(0.0, 1.0), **FAB)
  assert res.converged.all() and (np.asarray(res.iterations) >= 1).all()
  np.testing.assert_allclose(res.margin, expected, rtol=0.02)
  assert (np.asarray(res.margin) >= expected * (1 - 1e-5)).all()


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_first_order_is_deepfools_first_step_on_a_nonlinear_model(norm):
  params = attack_models.trained_mlp()
  logits_fn = functools.partial(attack_models.mlp_logits, params)
  x, y = attack_models.synthetic_images(1, 32)
  y[::4] = (y[::4] + 1) % 10  # some misclassified examples
  one_step = deepfool(
    logits_fn, x, y, norm=norm, num_candidates=4, max_iter=1, overshoot=0.0, clip=(0.0, 1.0)
  )
  res = _estimate('first_order', logits_fn, x, y, norm, num_candidates=4, clip=(0.0, 1.0))
  np.testing.assert_allclose(res.margin, one_step.margin, rtol=1e-5, atol=1e-7)
  assert (np.asarray(res.margin)[::4] < 0).any() and (np.asarray(res.margin) > 0).any()


@pytest.mark.parametrize('name', sorted(ESTIMATORS))
def test_each_result_depends_only_on_its_example(name):
  params = attack_models.trained_mlp()
  logits_fn = functools.partial(attack_models.mlp_logits, params)
  x, y = attack_models.synthetic_images(2, 12)
  y[::3] = (y[::3] + 2) % 10
  kw = dict(num_steps=2, restarts=4) if name == 'fab' else {}
  run = functools.partial(_estimate, name, logits_fn, norm='l2', num_candidates=4, clip=(0, 1))
  full = run(x, y, **kw)
  perm = np.random.RandomState(0).permutation(12)
  permuted = run(x[perm], y[perm], batch_size=5, **kw)  # other neighbours, chunks of 5
  alone = run(x[:1], y[:1], **kw)
  for a, b in zip(full, permuted, strict=True):
    np.testing.assert_allclose(np.asarray(a)[perm], b, rtol=1e-5, atol=1e-6)
  for a, b in zip(full, alone, strict=True):
    np.testing.assert_allclose(np.asarray(a)[:1], b, rtol=1e-5, atol=1e-6)
  # The same per device inside shard_map, as the margin stage runs DeepFool.
  fn = functools.partial(
    ESTIMATORS[name], logits_fn, norm='l2', num_candidates=4, clip=(0, 1), **kw
  )
  sharded = jax.jit(
    parallel.per_device(lambda a, b: tuple(fn(a, b)), parallel.make_mesh(), num_batched_args=2)
  )(jnp.asarray(x), jnp.asarray(y))
  for a, b in zip(full, sharded, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fab_restart_keys_follow_the_pixels_not_the_position():
  x, _ = attack_models.synthetic_images(3, 6)
  perm = np.array([3, 0, 5, 1, 4, 2])
  keys = jax.random.key_data(fab_margin.example_keys(0, x))
  np.testing.assert_array_equal(
    np.asarray(keys)[perm], jax.random.key_data(fab_margin.example_keys(0, x[perm]))
  )
  assert len({tuple(np.asarray(k).ravel()) for k in keys}) == 6
  other_seed = jax.random.key_data(fab_margin.example_keys(1, x))
  assert not np.array_equal(keys, other_seed)


def test_more_fab_budget_never_gives_a_larger_margin():
  """Longer runs and more restarts share the shorter run's steps, and FAB keeps the smallest."""
  params = attack_models.trained_mlp()
  logits_fn = functools.partial(attack_models.mlp_logits, params)
  x, y = attack_models.synthetic_images(4, 24)
  y[::3] = (y[::3] + 1) % 10
  run = functools.partial(_estimate, 'fab', logits_fn, x, y, 'l2', 5, clip=(0.0, 1.0))
  short = np.abs(run(num_steps=4, restarts=1).margin)
  longer = np.abs(run(num_steps=12, restarts=1).margin)
  restarted = np.abs(run(num_steps=4, restarts=3).margin)
  assert (longer <= short).all() and (restarted <= short).all()
  assert (longer < short).any() and (restarted < short).any()


def test_a_flat_model_is_not_converged():
  """Gradients of zero: nothing can move; first_order says 0, fab says +-inf, both unconverged."""
  bias = jnp.arange(4.0)
  logits_fn = lambda v: 0.0 * v.reshape(v.shape[0], -1)[:, :4] + bias
  x = np.full((3, 4), 0.5, np.float32)
  y = np.array([3, 1, 0], np.int32)  # correct, misclassified, misclassified
  for name in ESTIMATORS:
    res = _estimate(name, logits_fn, x, y, 'linf', 4, clip=(0.0, 1.0))
    assert not np.asarray(res.converged).any(), name
  res = _estimate('first_order', logits_fn, x, y, 'linf', 4, clip=(0.0, 1.0))
  np.testing.assert_array_equal(res.margin, 0.0)
  res = _estimate('fab', logits_fn, x, y, 'linf', 4, clip=(0.0, 1.0), num_steps=3)
  np.testing.assert_array_equal(res.margin, [np.inf, -np.inf, -np.inf])


def test_settings_from_config_follows_the_config():
  c = config_base.get_base_config()
  assert margin_estimators.settings_from_config(c.margins) == (
    'deepfool',
    {'overshoot': c.margins.overshoot, 'max_iter': c.margins.max_iter},
  )
  c.margins.estimator = 'first_order'
  assert margin_estimators.settings_from_config(c.margins) == ('first_order', {})
  c.margins.estimator = 'fab'
  c.margins.fab.restarts = 3
  name, settings = margin_estimators.settings_from_config(c.margins)
  assert name == 'fab' and settings['restarts'] == 3
  assert set(settings) == set(margin_estimators.SETTINGS['fab'])
  c.margins.fab.restarts = 0
  with pytest.raises(ValueError, match='restarts'):
    margin_estimators.settings_from_config(c.margins)
  c.margins.estimator = 'cw'
  with pytest.raises(ValueError, match='c.margins.estimator'):
    margin_estimators.settings_from_config(c.margins)


def test_fab_needs_the_image_box():
  _, _, logits_fn = _affine(3, 4, seed=0)
  x, y = np.zeros((2, 4), np.float32), np.zeros(2, np.int32)
  with pytest.raises(ValueError, match='c.margins.clip'):
    ESTIMATORS['fab'](logits_fn, x, y, norm='l2', num_candidates=3, clip=None)
