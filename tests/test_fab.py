"""FAB: the exact box-constrained projection, minimal perturbations of affine models,
and the threat model."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_models import affine, mlp_logits, synthetic_images, trained_mlp
from scipy import optimize

from puma_jax.attacks import fab as fab_lib
from puma_jax.attacks import lp
from puma_jax.attacks.apgd import target_classes


def _scipy_projection_norm(t, w, b, norm):
  """min ||d|| s.t. w.(t + d) = b, 0 <= t + d <= 1, solved by scipy (one problem)."""
  dim = t.shape[0]
  bounds = list(zip(-t, 1.0 - t, strict=True))
  if norm == 'linf':
    # Variables (d, s): minimise s with -s <= d_i <= s.
    cost = np.r_[np.zeros(dim), 1.0]
    a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
    res = optimize.linprog(
      cost,
      A_ub=a_ub,
      b_ub=np.zeros(2 * dim),
      A_eq=np.r_[w, 0.0][None],
      b_eq=[b - w @ t],
      bounds=bounds + [(0, None)],
    )
    assert res.status == 0, res.message
    return res.fun
  res = optimize.minimize(
    lambda d: d @ d,
    np.zeros(dim),
    jac=lambda d: 2 * d,
    bounds=bounds,
    constraints=[{'type': 'eq', 'fun': lambda d: w @ (t + d) - b, 'jac': lambda d: w}],
    method='SLSQP',
    options={'ftol': 1e-14, 'maxiter': 500},
  )
  assert res.success, res.message
  return np.sqrt(res.fun)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_projection_is_the_exact_box_constrained_minimum(norm):
  rng = np.random.default_rng(0)
  n, dim = 24, 7
  t = rng.uniform(0, 1, size=(n, dim))
  w = rng.normal(size=(n, dim))
  w[:4, :2] = 0.0  # coordinates that cannot help
  # Hyperplanes through random points of the box, so a solution exists; the far ones
  # push several coordinates against the box faces.
  b = np.sum(w * rng.uniform(0, 1, size=(n, dim)), axis=1)
  d = np.asarray(
    fab_lib.project_onto_boundary(
      jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32), norm
    ),
    np.float64,
  )
  np.testing.assert_allclose(np.sum(w * (t + d), axis=1), b, atol=1e-5)
  assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
  assert np.all(d[:4, :2] == 0)
  ord_ = np.inf if norm == 'linf' else 2
  ours = np.linalg.norm(d, ord=ord_, axis=1)
  best = np.array([_scipy_projection_norm(t[i], w[i], b[i], norm) for i in range(n)])
  np.testing.assert_allclose(ours, best, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
@pytest.mark.parametrize('dim', [48, 517, 3072])
def test_projection_lands_on_the_plane_when_the_normal_has_exact_zeros(norm, dim):
  # ReLU and max-pool models give gradients with exact zeros. Those coordinates cannot
  # move; the rounding residue of their slope sum once swamped the equation for lam.
  rng = np.random.default_rng(dim)
  n = 64
  t = rng.uniform(0, 1, size=(n, dim)).astype(np.float32)
  t[::4, : dim // 10] = rng.choice([0.0, 1.0], size=(len(t[::4]), dim // 10))  # on box faces
  w = rng.normal(size=(n, dim)).astype(np.float32)
  for row in w:
    row[rng.choice(dim, int(rng.integers(5, min(300, dim - 5) + 1)), replace=False)] = 0.0
  # Planes through random points of the box: every row has a solution.
  b = np.sum(w.astype(np.float64) * rng.uniform(0, 1, size=(n, dim)), axis=1).astype(np.float32)
  d = np.asarray(
    fab_lib.project_onto_boundary(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b), norm),
    np.float64,
  )
  z = t + d
  # On the plane up to float32 rounding of a D-term dot product: |w.z - b| <= 1e-6 sum|w|.
  residual = np.abs(np.sum(w * z, axis=1) - b) / np.sum(np.abs(w), axis=1)
  assert np.all(residual <= 1e-6), (np.sum(residual > 1e-6), residual.max())
  assert np.all((z >= -1e-6) & (z <= 1 + 1e-6))
  assert np.all(d[w == 0] == 0)


def test_projection_returns_the_corner_when_the_plane_misses_the_box():
  t = jnp.full((1, 3), 0.5)
  w = jnp.array([[1.0, -2.0, 0.0]])
  d = fab_lib.project_onto_boundary(t, w, jnp.array([10.0]), 'l2')
  # w.z is largest at z = (1, 0, anything); the last coordinate does not move.
  np.testing.assert_allclose(d, [[0.5, -0.5, 0.0]], atol=1e-6)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_minimal_perturbation_of_an_affine_binary_model(norm):
  """Inside the box the smallest change of decision is |f(x)| / ||w||_dual."""
  rng = np.random.default_rng(1)
  dim, batch = 64, 8
  w = rng.normal(size=dim)
  logits_fn = affine(np.stack([np.zeros(dim), w], axis=1), np.array([0.0, 0.2]))
  x = rng.uniform(0.4, 0.6, size=(batch, 8, 8, 1)).astype(np.float32)
  y = jnp.argmax(logits_fn(x), axis=-1)
  f = np.asarray(x.reshape(batch, -1) @ w + 0.2)
  exact = np.abs(f) / np.linalg.norm(w, ord=1 if norm == 'linf' else 2)
  # The box is not in the way: the exact step moves no pixel by 0.4 or more.
  largest_move = exact if norm == 'linf' else exact * np.max(np.abs(w)) / np.linalg.norm(w)
  assert np.all(largest_move < 0.4)

  out = fab_lib.fab(logits_fn, x, y, 1 - y, 10.0, norm=norm, num_steps=50, stop_on_success=False)
  ratio = np.asarray(out.distance) / exact
  assert np.all(ratio >= 1 - 1e-5) and np.all(ratio <= 1.01), ratio
  np.testing.assert_allclose(lp.lp_norm(out.x_adv - x, norm), out.distance, rtol=1e-5)
  assert bool(jnp.all(jnp.argmax(logits_fn(out.x_adv), axis=-1) != y))


def _fab_transcription(logits_fn, x, y, target, *, norm, num_steps, alpha_max, eta, beta):
  """FAB's iteration transcribed from the paper in NumPy (projection from fab_lib, which
  the test above checks against scipy). Returns the smallest adversarial norm found."""
  batch = x.shape[0]
  x0 = np.asarray(x).reshape(batch, -1)
  rows = np.arange(batch)
  ord_ = np.inf if norm == 'linf' else 2

  logits_jit = jax.jit(lambda z: logits_fn(z.reshape(x.shape)))
  project_jit = jax.jit(functools.partial(fab_lib.project_onto_boundary, norm=norm))

  def logits(z):
    return np.asarray(logits_jit(jnp.asarray(z, jnp.float32)))

  @jax.jit
  def diff_and_grad_jit(z):
    def f(z):
      out = logits_fn(z.reshape(x.shape))
      return out[rows, target] - out[rows, y]

    return f(z), jax.grad(lambda z: jnp.sum(f(z)))(z)

  def diff_and_grad(z):
    return tuple(map(np.asarray, diff_and_grad_jit(jnp.asarray(z, jnp.float32))))

  def step_to_plane(t, w, b):
    return np.asarray(project_jit(*(jnp.asarray(a, jnp.float32) for a in (t, w, b))))

  x1, best = x0.copy(), np.full(batch, np.inf)
  for _ in range(num_steps):
    f, w = diff_and_grad(x1)
    b = np.sum(w * x1, axis=1) - f  # the linearised boundary w.z = b
    d1, d2 = step_to_plane(x1, w, b), step_to_plane(x0, w, b)
    n1 = np.maximum(np.linalg.norm(d1, ord=ord_, axis=1), 1e-12)
    n2 = np.maximum(np.linalg.norm(d2, ord=ord_, axis=1), 1e-12)
    alpha = np.minimum(n1 / (n1 + n2), alpha_max)[:, None]
    x1 = np.clip((1 - alpha) * (x1 + eta * d1) + alpha * (x0 + eta * d2), 0, 1)
    adv = np.argmax(logits(x1), axis=1) != np.asarray(y)
    dist = np.linalg.norm(x1 - x0, ord=ord_, axis=1)
    best = np.where(adv, np.minimum(best, dist), best)
    x1[adv] = x0[adv] + beta * (x1[adv] - x0[adv])
  return best


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_matches_a_transcription_of_the_iteration(norm):
  logits_fn = functools.partial(mlp_logits, trained_mlp())
  x, y = synthetic_images(7, 32)
  x, y = jnp.asarray(x), jnp.asarray(y)
  target = target_classes(logits_fn(x), 1)[:, 0]
  # Non-default constants, so that each of them is checked.
  kwargs = dict(num_steps=20, alpha_max=0.2, eta=1.1, beta=0.8)
  expected = _fab_transcription(logits_fn, x, y, target, norm=norm, **kwargs)
  out = fab_lib.fab(logits_fn, x, y, target, 10.0, norm=norm, stop_on_success=False, **kwargs)
  assert np.all(np.isfinite(expected))
  np.testing.assert_allclose(out.distance, expected, rtol=1e-4)


@pytest.mark.parametrize('norm,eps', [('linf', 0.12), ('l2', 0.8)])
def test_fab_targeted_respects_the_threat_model(norm, eps):
  logits_fn = functools.partial(mlp_logits, trained_mlp())
  x, y = synthetic_images(7, 32)
  x, y = jnp.asarray(x), jnp.asarray(y)
  y = y.at[0].set((y[0] + 1) % 10)  # a misclassified input: distance 0
  active = jnp.arange(32) % 5 != 1
  run = functools.partial(fab_lib.fab_targeted, logits_fn, norm=norm, num_steps=30, active=active)
  out = jax.jit(run)(x, y, eps)
  assert bool(out.success[0]) and float(out.distance[0]) == 0.0
  assert 0 < int(out.success.sum()) < int(active.sum())
  norms = lp.lp_norm(out.x_adv - x, norm)
  np.testing.assert_allclose(norms[out.success], out.distance[out.success], rtol=1e-5, atol=1e-7)
  assert float(jnp.max(norms[out.success])) <= eps
  assert float(jnp.min(out.x_adv)) >= 0.0 and float(jnp.max(out.x_adv)) <= 1.0
  wrong = jnp.argmax(logits_fn(out.x_adv), axis=-1) != y
  assert bool(jnp.all(wrong[out.success]))
  assert not bool(jnp.any(out.success[~active]))
  chex.assert_trees_all_equal(out.x_adv[~active], x[~active])
  # Deterministic: no randomness at all in FAB-T.
  chex.assert_trees_all_equal(out, jax.jit(run)(x, y, eps))
