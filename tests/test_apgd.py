"""APGD: the published step-size schedule, exact optima of affine models, the threat
model, strength against PGD, and per-example independence."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_models import affine, mlp_logits, synthetic_images, trained_mlp

from puma_jax.attacks import apgd as apgd_lib
from puma_jax.attacks import losses, lp


@pytest.fixture(scope='module')
def mlp():
  params = trained_mlp()
  x, y = synthetic_images(7, 32)
  return functools.partial(mlp_logits, params), jnp.asarray(x), jnp.asarray(y)


def test_checkpoints_follow_the_paper():
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
  assert apgd_lib.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert apgd_lib.checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_halving_conditions():
  # Example by example: (increases in a window of 10, best now, best at the last
  # checkpoint, halved at the last checkpoint) -> halve now?
  cases = [
    (7, 1.0, 0.5, False, True),  # 7 <= 7.5 increases: oscillating
    (8, 1.0, 0.5, False, False),  # rising and improving
    (8, 0.5, 0.5, False, True),  # rising but the best did not improve
    (8, 0.5, 0.5, True, False),  # ... but the step was just halved
    (10, 0.4, 0.5, False, True),  # best below the last check (cannot happen; >= holds)
  ]
  inc, best, best_at, reduced, expected = map(np.array, zip(*cases, strict=True))
  out = apgd_lib.halve_step(
    jnp.asarray(inc),
    jnp.asarray(10),
    jnp.asarray(best),
    jnp.asarray(best_at),
    jnp.asarray(reduced),
    rho=0.75,
  )
  np.testing.assert_array_equal(out, expected)


def test_target_classes_are_the_next_largest_logits():
  logits = jnp.array([[0.0, 5.0, 1.0, 3.0, 2.0]])
  np.testing.assert_array_equal(apgd_lib.target_classes(logits, 3), [[3, 4, 2]])
  assert apgd_lib.target_classes(logits, 9).shape == (1, 4)  # capped at K - 1


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_reaches_the_exact_maximum_of_an_affine_binary_model(norm):
  # For logits (0, w.x + b) the cross-entropy grows as the label's margin shrinks, so
  # its maximum over the ball (inside the box here) is at x - eps g / ||g||_dual.
  rng = np.random.default_rng(0)
  dim, batch = 64, 8
  w = rng.normal(size=dim)
  weights = np.stack([np.zeros(dim), w], axis=1)
  logits_fn = affine(weights, np.array([0.0, 0.1]))
  x = rng.uniform(0.3, 0.7, size=(batch, 8, 8, 1)).astype(np.float32)
  y = jnp.argmax(logits_fn(x), axis=-1)
  eps = 0.05 if norm == 'linf' else 0.2
  g = np.where(np.asarray(y)[:, None] == 1, 1.0, -1.0) * w  # gradient of the label's margin
  step = np.sign(g) if norm == 'linf' else g / np.linalg.norm(g, axis=1, keepdims=True)
  x_star = x.reshape(batch, -1) - eps * step
  best = losses.cross_entropy(logits_fn(jnp.asarray(x_star, jnp.float32)), y)

  out = apgd_lib.apgd(
    logits_fn, jax.random.key(1), x, y, eps, norm=norm, num_steps=20, stop_on_success=False
  )
  np.testing.assert_allclose(out.loss_best, best, rtol=1e-4)
  # L2 approaches the optimum along the sphere; the loss is flat to first order there.
  atol = 1e-5 if norm == 'linf' else 5e-4
  np.testing.assert_allclose(out.x_best.reshape(batch, -1), x_star, atol=atol)


def _apgd_transcription(logits_fn, x, y, eps, start, *, norm, num_steps, rho=0.75):
  """APGD transcribed step by step from the paper, in NumPy with a Python loop.

  Keeps the whole loss history and counts increases over each window between
  checkpoints; returns the best loss per example.
  """
  batch = x.shape[0]
  x = np.asarray(x)
  flat = lambda v: v.reshape(batch, -1)  # noqa: E731

  @jax.jit
  def value_grad_jit(z):
    value = losses.cross_entropy(logits_fn(z), y)
    return value, jax.grad(lambda z: jnp.sum(losses.cross_entropy(logits_fn(z), y)))(z)

  def value_grad(z):
    value, grad = value_grad_jit(jnp.asarray(z, jnp.float32))
    return np.array(value), np.array(grad)

  def project(z):
    d = flat(z - x)
    if norm == 'linf':
      d = np.clip(d, -eps, eps)
    else:
      n = np.linalg.norm(d, axis=1, keepdims=True)
      d = d * np.minimum(eps, n) / (n + 1e-12)
    return np.clip(x + d.reshape(x.shape), 0.0, 1.0)

  def direction(g):
    if norm == 'linf':
      return np.sign(g)
    n = np.linalg.norm(flat(g), axis=1).reshape((batch,) + (1,) * (x.ndim - 1))
    return g / (n + 1e-12)

  col = (slice(None),) + (None,) * (x.ndim - 1)
  x_k = np.array(start)
  f_k, g_k = value_grad(x_k)
  x_best, g_best, f_best = x_k.copy(), g_k.copy(), f_k.copy()
  history = [f_k]
  eta = np.full(batch, 2.0 * eps, np.float32)
  x_prev = x_k.copy()
  checks = set(apgd_lib.checkpoints(num_steps))
  last_check, f_best_last, reduced_last = 0, f_best.copy(), np.ones(batch, bool)
  for k in range(num_steps):
    alpha = 1.0 if k == 0 else 0.75
    z = project(x_k + eta[col] * direction(g_k))
    x_next = project(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_prev))
    x_prev = x_k
    x_k = x_next
    f_k, g_k = value_grad(x_k)
    history.append(f_k)
    better = f_k > f_best
    x_best[better], g_best[better], f_best[better] = x_k[better], g_k[better], f_k[better]
    if k + 1 in checks:
      window = k + 1 - last_check
      ups = sum(history[i] > history[i - 1] for i in range(last_check + 1, k + 2))
      halve = (ups <= rho * window) | (~reduced_last & (f_best_last >= f_best))
      eta[halve] /= 2
      x_k[halve], g_k[halve] = x_best[halve], g_best[halve]
      last_check, f_best_last, reduced_last = k + 1, f_best.copy(), halve
  return f_best


@pytest.mark.parametrize('norm,eps', [('linf', 0.1), ('l2', 0.7)])
def test_matches_a_transcription_of_the_algorithm(mlp, norm, eps):
  """Step sizes, momentum, both halving conditions and restarts, step by step."""
  logits_fn, x, y = mlp
  keys = jax.random.split(jax.random.key(4), x.shape[0])
  start = lp.random_on_sphere(keys, x, lp.batch_eps(eps, x.shape[0]), norm)
  expected = _apgd_transcription(logits_fn, x, y, eps, start, norm=norm, num_steps=30)
  run = functools.partial(apgd_lib.apgd, logits_fn, norm=norm, num_steps=30, stop_on_success=False)
  out = jax.jit(run)(keys, x, y, eps)
  # float32 rounding differs between the two, and can flip a comparison of two nearly
  # equal losses of a low-loss example, so allow a small relative difference.
  np.testing.assert_allclose(out.loss_best, expected, rtol=2e-3)


def test_halving_converges_to_an_interior_maximum():
  """A loss peaked at c inside the ball: fixed 2 eps steps cannot settle on c."""
  rng = np.random.default_rng(0)
  batch, dim = 8, 16
  x = np.full((batch, dim), 0.5, np.float32)
  c = jnp.asarray(x + rng.uniform(-0.08, 0.08, size=(batch, dim)), jnp.float32)

  def logits_fn(z):
    s = 1.0 - 10.0 * jnp.sum((z - c) ** 2, axis=-1)
    return jnp.stack([jnp.zeros_like(s), s], axis=-1)

  y = jnp.zeros(batch, jnp.int32)
  for norm, eps in (('linf', 0.1), ('l2', 0.4)):
    out = apgd_lib.apgd(
      logits_fn, jax.random.key(0), x, y, eps, norm=norm, num_steps=100, stop_on_success=False
    )
    assert float(jnp.max(jnp.abs(out.x_best - c))) < 5e-3, norm


def _pgd(logits_fn, rng, x, y, eps, *, norm, num_steps):
  """Plain PGD with a random start, step 2.5 eps / num_steps (Madry et al.); best CE."""
  eps_b = lp.batch_eps(eps, x.shape[0])
  z = lp.random_on_sphere(lp.example_keys(rng, x.shape[0]), x, eps_b, norm)

  def ce(z):
    return losses.cross_entropy(logits_fn(z), y)

  def step(_, carry):
    z, best = carry
    value, grad = ce(z), jax.grad(lambda z: jnp.sum(ce(z)))(z)
    direction = jnp.sign(grad) if norm == 'linf' else lp.normalize(grad, 'l2')
    z = lp.project(z + 2.5 * eps / num_steps * direction, x, eps_b, norm)
    return z, jnp.maximum(best, value)

  z, best = jax.lax.fori_loop(0, num_steps, step, (z, jnp.full(x.shape[0], -jnp.inf)))
  return jnp.maximum(best, ce(z))


@pytest.mark.parametrize('norm,eps', [('linf', 0.1), ('l2', 0.7)])
def test_loss_at_least_that_of_pgd_with_the_same_budget(mlp, norm, eps):
  logits_fn, x, y = mlp
  pgd_loss = jax.jit(functools.partial(_pgd, logits_fn, norm=norm, num_steps=20))(
    jax.random.key(3), x, y, eps
  )
  run = functools.partial(apgd_lib.apgd, logits_fn, norm=norm, num_steps=20, stop_on_success=False)
  out = jax.jit(run)(jax.random.key(3), x, y, eps)
  apgd_mean, pgd_mean = float(jnp.mean(out.loss_best)), float(jnp.mean(pgd_loss))
  assert apgd_mean >= pgd_mean, (apgd_mean, pgd_mean)


@pytest.mark.parametrize('norm,eps,loss', [('linf', 0.12, 'ce'), ('l2', 0.8, 'dlr_targeted')])
def test_points_respect_the_threat_model(mlp, norm, eps, loss):
  logits_fn, x, y = mlp
  active = jnp.arange(x.shape[0]) % 4 != 0
  target = apgd_lib.target_classes(logits_fn(x), 1)[:, 0]
  fn = jax.jit(
    functools.partial(
      apgd_lib.apgd, logits_fn, norm=norm, loss=loss, target=target, num_steps=30, active=active
    )
  )
  out = fn(jax.random.key(0), x, y, eps)
  for z in (out.x_adv, out.x_best):
    assert float(jnp.max(lp.lp_norm(z - x, norm))) <= eps + 1e-6
    assert float(jnp.min(z)) >= 0.0 and float(jnp.max(z)) <= 1.0
  wrong = jnp.argmax(logits_fn(out.x_adv), axis=-1) != y
  assert bool(jnp.all(wrong[out.success]))
  assert 0 < int(out.success.sum()) < int(active.sum())  # eps breaks some, not all
  # Inactive examples are untouched.
  assert not bool(jnp.any(out.success[~active]))
  chex.assert_trees_all_equal(out.x_adv[~active], x[~active])


def test_each_example_is_independent_of_its_batch(mlp):
  """Same per-example keys -> same result in a permuted sub-batch, and on a re-run."""
  logits_fn, x, y = mlp
  keys = jax.random.split(jax.random.key(5), x.shape[0])
  fn = jax.jit(functools.partial(apgd_lib.apgd_targeted, logits_fn, norm='linf', num_steps=15))
  full = fn(keys, x, y, 0.12)
  chex.assert_trees_all_equal(full, fn(keys, x, y, 0.12))
  perm = np.random.default_rng(0).permutation(x.shape[0])[:12]
  part = jax.jit(functools.partial(apgd_lib.apgd_targeted, logits_fn, norm='linf', num_steps=15))(
    keys[perm], x[perm], y[perm], 0.12
  )
  np.testing.assert_array_equal(part.success, full.success[perm])
  np.testing.assert_allclose(part.x_adv, full.x_adv[perm], atol=1e-6)
  # Another seed gives another random start.
  other = fn(jax.random.split(jax.random.key(6), x.shape[0]), x, y, 0.12)
  assert float(jnp.max(jnp.abs(other.x_best - full.x_best))) > 0


def test_bad_inputs_are_named():
  logits_fn = affine(np.ones((4, 2)), np.zeros(2))
  x, y = jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32)
  with pytest.raises(ValueError, match='dlr loss needs at least 3 classes'):
    apgd_lib.apgd(logits_fn, jax.random.key(0), x, y, 0.1, norm='linf', loss='dlr')
  with pytest.raises(ValueError, match="unknown norm 'l1'"):
    apgd_lib.apgd(logits_fn, jax.random.key(0), x, y, 0.1, norm='l1')
  with pytest.raises(TypeError, match='typed key'):
    apgd_lib.apgd(logits_fn, jax.random.PRNGKey(0), x, y, 0.1, norm='linf')
  with pytest.raises(ValueError, match='needs `target`'):
    apgd_lib.apgd(logits_fn, jax.random.key(0), x, y, 0.1, norm='linf', loss='dlr_targeted')
