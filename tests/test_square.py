"""Square Attack: its schedule and L2 pattern, breaking an easy model, the threat
model, and per-example independence."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_models import mlp_logits, synthetic_images, trained_mlp

from puma_jax.attacks import losses, lp
from puma_jax.attacks import square as square_lib


def test_window_sides_follow_the_schedule():
  sides = square_lib.window_sides(9000, 0.8, 32, 32, 'linf')
  # round(sqrt(p * 1024)) with p = 0.8 / 2^k, k counting the halvings passed.
  expected = {0: 29, 10: 29, 11: 20, 50: 20, 51: 14, 201: 10, 501: 7, 1001: 5, 2001: 4}
  expected |= {4001: 3, 6001: 2, 8001: 1}
  assert {i: int(sides[i]) for i in expected} == expected
  sides_l2 = square_lib.window_sides(9000, 0.8, 32, 32, 'l2')
  assert np.all(sides_l2 % 2 == 1) and sides_l2.min() == 3 and sides_l2[0] == 29
  assert square_lib.window_sides(10, 0.8, 4, 4, 'linf').max() == 4  # capped at the image


@pytest.mark.parametrize('side', [3, 4, 5, 8])
def test_traced_l2_pattern_matches_its_definition(side):
  height = width = 10
  top, left = jnp.array([1, height - side]), jnp.array([width - side, 0])
  sides = jnp.full(2, side)
  inside, i, j = square_lib._window(height, width, top, left, sides)
  pattern = square_lib._pattern(inside, i, j, sides, jnp.array([False, True]))
  eta = square_lib.eta_pattern(side)
  np.testing.assert_allclose(np.sum(eta**2), 1.0)
  expected = np.zeros((2, height, width))
  expected[0, 1 : 1 + side, width - side :] = eta
  expected[1, height - side :, :side] = eta.T
  np.testing.assert_allclose(pattern, expected, atol=1e-6)


def _reference_query(x, x_best, eps, norm, side, corners, flip, signs):
  """One query of the reference algorithm for one image f64[H,W,C], with slices."""
  top, left, top2, left2 = corners
  win = (slice(top, top + side), slice(left, left + side))
  if norm == 'linf':
    new = x_best.copy()
    new[win] += 2 * eps * signs
    return np.clip(np.clip(new, x - eps, x + eps), 0, 1)
  win2 = (slice(top2, top2 + side), slice(left2, left2 + side))
  delta = x_best - x
  mask = np.zeros(x.shape[:2] + (1,))
  mask[win] = mask[win2] = 1
  norm_image = np.sqrt(np.sum(delta**2))
  norm_windows = np.sqrt(np.sum((delta * mask) ** 2, axis=(0, 1)))
  eta = square_lib.eta_pattern(side)
  new = (eta.T if flip else eta)[:, :, None] * signs
  new += delta[win] / (1e-12 + np.sqrt(np.sum(delta[win] ** 2, axis=(0, 1))))
  scale = np.sqrt(max(eps**2 - norm_image**2, 0) / x.shape[-1] + norm_windows**2)
  new = new / (1e-12 + np.sqrt(np.sum(new**2, axis=(0, 1)))) * scale
  delta[win2] = 0
  delta[win] = new
  return np.clip(x + delta / np.sqrt(np.sum(delta**2)) * eps, 0, 1)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_query_matches_the_reference_update(norm):
  rng = np.random.default_rng(0)
  batch, height, width, channels = 6, 10, 10, 3
  eps = 0.1 if norm == 'linf' else 1.0
  x = rng.uniform(0, 1, size=(batch, height, width, channels))
  if norm == 'linf':  # Square's points sit on the faces of the ball
    x_best = np.clip(x + eps * rng.choice([-1.0, 1.0], size=x.shape), 0, 1)
  else:
    d = rng.normal(size=x.shape)
    x_best = np.clip(
      x + 0.8 * eps * d / np.linalg.norm(d.reshape(batch, -1), axis=1)[:, None, None, None], 0, 1
    )
  side = np.array([1, 3, 4, 5, 10, 3]) if norm == 'linf' else np.array([3, 3, 5, 7, 9, 3])
  corners = [rng.integers(0, height - side + 1) for _ in range(4)]
  flip = rng.integers(0, 2, size=batch).astype(bool)
  signs = rng.choice([-1.0, 1.0], size=(batch, 1, 1, channels))
  out = square_lib.propose(
    *(jnp.asarray(a, jnp.float32) for a in (x, x_best)),
    jnp.full(batch, eps, jnp.float32),
    norm=norm,
    side=jnp.asarray(side),
    corners=tuple(jnp.asarray(c) for c in corners),
    flip=jnp.asarray(flip),
    signs=jnp.asarray(signs, jnp.float32),
  )
  for b in range(batch):
    expected = _reference_query(
      x[b], x_best[b], eps, norm, side[b], [c[b] for c in corners], flip[b], signs[b, 0, 0]
    )
    np.testing.assert_allclose(out[b], expected, atol=2e-6)


@pytest.fixture(scope='module')
def mlp():
  x, y = synthetic_images(7, 32)
  return functools.partial(mlp_logits, trained_mlp()), jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize('norm,eps', [('linf', 0.2), ('l2', 1.5)])
def test_breaks_an_easy_model_within_the_threat_model(mlp, norm, eps):
  logits_fn, x, y = mlp
  active = jnp.arange(32) % 8 != 3
  run = functools.partial(square_lib.square, logits_fn, norm=norm, num_queries=1000, active=active)
  out = jax.jit(run)(jax.random.key(0), x, y, eps)
  assert float(jnp.mean(out.success[active])) >= 0.9
  assert float(jnp.max(lp.lp_norm(out.x_adv - x, norm))) <= eps + 1e-6
  assert float(jnp.min(out.x_adv)) >= 0.0 and float(jnp.max(out.x_adv)) <= 1.0
  margin = -losses.cw_loss(logits_fn(out.x_adv), y)
  np.testing.assert_allclose(margin[active], out.margin[active], rtol=1e-5, atol=1e-5)
  assert bool(jnp.all(jnp.argmax(logits_fn(out.x_adv), axis=-1)[out.success] != y[out.success]))
  # Queries stop at success: the broken examples used fewer than the budget.
  assert int(jnp.max(out.queries[out.success])) < 1001
  assert not bool(jnp.any(out.success[~active])) and not bool(jnp.any(out.queries[~active]))
  chex.assert_trees_all_equal(out.x_adv[~active], x[~active])


@pytest.mark.parametrize('norm,eps', [('l2', 1.2)])  # L2 draws every kind of random number
def test_each_example_is_independent_of_its_batch(mlp, norm, eps):
  logits_fn, x, y = mlp
  keys = jax.random.split(jax.random.key(2), 32)
  run = jax.jit(functools.partial(square_lib.square, logits_fn, norm=norm, num_queries=200))
  full = run(keys, x, y, eps)
  assert 0 < int(full.success.sum()) < 32
  chex.assert_trees_all_equal(full, run(keys, x, y, eps))
  perm = np.random.default_rng(0).permutation(32)[:8]
  part = jax.jit(functools.partial(square_lib.square, logits_fn, norm=norm, num_queries=200))(
    keys[perm], x[perm], y[perm], eps
  )
  np.testing.assert_array_equal(part.success, full.success[perm])
  np.testing.assert_array_equal(part.queries, full.queries[perm])
  np.testing.assert_allclose(part.x_adv, full.x_adv[perm], atol=1e-6)


def test_bad_inputs_are_named():
  x, y = jnp.zeros((2, 4, 4, 1)), jnp.zeros(2, jnp.int32)
  with pytest.raises(ValueError, match='at least 5x5'):
    square_lib.square(lambda z: z[:, 0, 0], jax.random.key(0), x, y, 0.5, norm='l2')
  with pytest.raises(ValueError, match=r'images f32\[B,H,W,C\]'):
    square_lib.square(lambda z: z, jax.random.key(0), x[:, :, 0, 0], y, 0.5, norm='linf')
