"""PGD and TRADES with per-example eps: bounds, identity, direction, invariance, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puma_jax import parallel
from puma_jax.attacks import losses, lp, pgd, trades_perturb

B = 16
EPS = np.array([0.1, 0.03, 0.0, -0.05, 0.2, -0.1, 0.0, 0.05] * 2, np.float32)


def _model(seed=0):
  rs = np.random.RandomState(seed)
  w1 = rs.randn(3 * 4 * 4, 16).astype(np.float32)
  w2 = rs.randn(16, 5).astype(np.float32)
  return lambda v: jnp.tanh(v.reshape(v.shape[0], -1) @ w1) @ w2


def _data(seed=0):
  rs = np.random.RandomState(seed)
  x = rs.rand(B, 4, 4, 3).astype(np.float32)
  x[:2] = np.round(x[:2])  # Pixels on the box faces.
  return x, rs.randint(0, 5, B).astype(np.int32)


def _norms(delta, norm):
  flat = np.asarray(delta, np.float64).reshape(len(delta), -1)
  return np.abs(flat).max(1) if norm == 'linf' else np.linalg.norm(flat, axis=1)


def _ce_fn(logits_fn):
  return lambda v, y: losses.cross_entropy(logits_fn(v), y)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_pgd_respects_each_radius_and_direction(norm):
  logits_fn = _model()
  x, y = _data()
  loss_fn = _ce_fn(logits_fn)
  attack = jax.jit(
    functools.partial(pgd, loss_fn, norm=norm, num_steps=10, step_size=0.25, random_start=True)
  )
  x_adv = np.asarray(attack(jax.random.key(0), x, y, EPS))
  assert x_adv.dtype == np.float32 and x_adv.min() >= 0 and x_adv.max() <= 1
  assert (_norms(x_adv - x, norm) <= np.abs(EPS) + 1e-6).all()
  # eps = 0 returns x exactly.
  np.testing.assert_array_equal(x_adv[EPS == 0], x[EPS == 0])
  # Positive eps raises the loss, negative eps lowers it.
  clean, adv = np.asarray(loss_fn(x, y)), np.asarray(loss_fn(x_adv, y))
  assert (adv[EPS > 0] > clean[EPS > 0]).all()
  assert (adv[EPS < 0] < clean[EPS < 0]).all()
  # The attack uses its budget: most examples end on the sphere of their radius.
  on_sphere = np.isclose(_norms(x_adv - x, norm), np.abs(EPS), rtol=1e-3)[EPS != 0]
  assert on_sphere.mean() >= 0.5


def test_split_eps_is_the_meaning_of_a_signed_radius():
  radius, direction = lp.split_eps(EPS)
  np.testing.assert_array_equal(radius, np.abs(EPS))
  np.testing.assert_array_equal(direction, np.sign(EPS))
  # Without a helpful direction (TRADES), radii <= 0 are clean: radius 0, direction 0.
  radius, direction = lp.split_eps(EPS, helpful=False)
  np.testing.assert_array_equal(radius, np.where(EPS > 0, EPS, 0.0))
  np.testing.assert_array_equal(direction, (EPS > 0).astype(np.float32))


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_projection_keeps_points_inside_and_pulls_others_to_the_sphere(norm):
  x, _ = _data(5)
  radius = np.abs(EPS)
  step = np.random.RandomState(6).randn(*x.shape).astype(np.float32)
  inside = np.clip(x + 1e-3 * lp.normalize(step, norm), 0, 1)  # within every radius >= 1e-3
  kept = np.asarray(lp.project(inside, x, radius, norm))
  big = radius >= 1e-3
  np.testing.assert_array_equal(kept[big], np.clip(x + (inside - x), 0, 1)[big])
  outside = np.asarray(lp.project(x + 10.0 * step, x, radius, norm))
  assert (_norms(outside - x, norm) <= radius + 1e-6).all()
  assert outside.min() >= 0 and outside.max() <= 1
  np.testing.assert_array_equal(outside[radius == 0], x[radius == 0])


def test_pgd_step_size_and_random_start_scale_with_eps():
  loss_fn = lambda v, y: jnp.sum(v.reshape(v.shape[0], -1), axis=1)  # gradient all ones
  x = np.full((B, 4, 4, 3), 0.5, np.float32)
  y = np.zeros(B, np.int32)
  eps = np.abs(EPS)
  one_step = pgd(
    loss_fn, jax.random.key(0), x, y, eps, num_steps=1, step_size=0.25, random_start=False
  )
  np.testing.assert_allclose(
    np.asarray(one_step) - x, np.broadcast_to(0.25 * eps[:, None, None, None], x.shape), atol=1e-7
  )
  start = pgd(loss_fn, jax.random.key(1), x, y, eps, num_steps=0, step_size=0.25)
  delta = np.abs(np.asarray(start) - x).reshape(B, -1)
  assert (delta.max(1) <= eps + 1e-7).all() and (delta.max(1) >= 0.9 * eps).all()


def test_pgd_batch_invariance():
  logits_fn = _model(1)
  x, y = _data(1)
  fn = functools.partial(pgd, _ce_fn(logits_fn), num_steps=5, step_size=0.25, random_start=False)
  whole = fn(jax.random.key(0), x, y, EPS)
  part = fn(jax.random.key(0), x[3:7], y[3:7], EPS[3:7])
  np.testing.assert_allclose(np.asarray(whole)[3:7], part, atol=1e-6)


def test_pgd_rejects_bad_eps_shape():
  with pytest.raises(ValueError, match='one radius per example'):
    pgd(
      lambda v, y: v.sum(),
      jax.random.key(0),
      np.zeros((4, 2)),
      None,
      np.zeros(3),
      num_steps=1,
      step_size=0.1,
    )


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_trades_bounds_clean_radii_and_kl_rise(norm):
  logits_fn = _model(2)
  x, _ = _data(2)
  attack = jax.jit(
    functools.partial(trades_perturb, logits_fn, norm=norm, num_steps=10, step_size=0.25)
  )
  x_adv = np.asarray(attack(jax.random.key(3), x, EPS))
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  assert (_norms(x_adv - x, norm) <= np.maximum(EPS, 0) + 1e-6).all()
  # eps <= 0 is clean: x exactly.
  np.testing.assert_array_equal(x_adv[EPS <= 0], x[EPS <= 0])
  kl = np.asarray(losses.kl_divergence(logits_fn(x), logits_fn(x_adv)))
  # The KL rises well above its value at the random start (zero steps).
  start = trades_perturb(
    logits_fn, jax.random.key(3), x, EPS, norm=norm, num_steps=0, step_size=0.25
  )
  kl_start = np.asarray(losses.kl_divergence(logits_fn(x), logits_fn(start)))
  assert (kl[EPS > 0] > 10 * kl_start[EPS > 0]).all()


def test_trades_batch_invariance_given_the_same_start():
  logits_fn = _model(3)
  x, _ = _data(3)
  other = np.random.RandomState(9).rand(*x.shape).astype(np.float32)
  fn = jax.jit(functools.partial(trades_perturb, logits_fn, num_steps=5, step_size=0.25))
  # Same positions, same key: identical random starts for rows 0-7; the other rows differ.
  a = fn(jax.random.key(0), x, EPS)
  b = fn(jax.random.key(0), np.concatenate([x[:8], other[8:]]), EPS)
  np.testing.assert_allclose(np.asarray(a)[:8], np.asarray(b)[:8], atol=1e-6)


def test_sharded_equals_single_device():
  logits_fn = _model(4)
  x, y = _data(4)
  key = jax.random.key(5)
  mesh = parallel.make_mesh()
  sharding = parallel.data_sharding(mesh)
  xs, ys, es = (jax.device_put(a, sharding) for a in (x, y, EPS))
  run_pgd = jax.jit(functools.partial(pgd, _ce_fn(logits_fn), num_steps=5, step_size=0.25))
  run_trades = jax.jit(functools.partial(trades_perturb, logits_fn, num_steps=5, step_size=0.25))
  np.testing.assert_allclose(run_pgd(key, xs, ys, es), run_pgd(key, x, y, EPS), atol=1e-6)
  np.testing.assert_allclose(run_trades(key, xs, es), run_trades(key, x, EPS), atol=1e-6)
