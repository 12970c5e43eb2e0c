"""DeepFool: exact margins of affine classifiers, candidates, stopping, sharding."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puma_jax import parallel
from puma_jax.attacks import deepfool

DUAL = {'l2': 2, 'linf': 1}
PRIMAL = {'l2': 2, 'linf': np.inf}


def _affine(num_classes, dim, seed):
  rs = np.random.RandomState(seed)
  w = rs.randn(dim, num_classes).astype(np.float32)
  b = rs.randn(num_classes).astype(np.float32) * 0.1
  return w, b, lambda v: v.reshape(v.shape[0], -1) @ w + b


def _closed_form(w, b, x, y, norm):
  """min_{k != y} (f_y - f_k) / ||w_y - w_k||_q for each row (float64)."""
  w, b, x = w.astype(np.float64), b.astype(np.float64), x.reshape(len(x), -1).astype(np.float64)
  f = x @ w + b
  out = []
  for i, yi in enumerate(y):
    out.append(
      min(
        (f[i, yi] - f[i, k]) / np.linalg.norm(w[:, yi] - w[:, k], DUAL[norm])
        for k in range(w.shape[1])
        if k != yi
      )
    )
  return np.array(out)


@pytest.mark.parametrize('norm', ['l2', 'linf'])
@pytest.mark.parametrize('num_classes', [2, 7])
def test_affine_margins_match_closed_form(norm, num_classes):
  w, b, logits_fn = _affine(num_classes, 12, seed=num_classes)
  x = np.random.RandomState(1).rand(16, 3, 4).astype(np.float32)
  y = np.argmax(logits_fn(x), axis=1)
  res = jax.jit(functools.partial(deepfool, logits_fn, norm=norm, num_candidates=num_classes))(x, y)
  expected = _closed_form(w, b, x, y, norm)
  np.testing.assert_allclose(res.margin, expected, rtol=1e-4)
  np.testing.assert_array_equal(res.iterations, 1)
  assert res.converged.all()
  chex.assert_type([res.margin, res.perturbation], jnp.float32)
  # The perturbation (overshoot included) flips every prediction and has the norm of
  # (1 + overshoot) * (margin + stability term).
  assert (np.argmax(logits_fn(x + res.perturbation), axis=1) != y).all()
  size = np.linalg.norm(np.asarray(res.perturbation).reshape(16, -1), PRIMAL[norm], axis=1)
  np.testing.assert_allclose(size, 1.02 * (expected + 1e-4), rtol=1e-4)


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_misclassified_gets_negative_closed_form_with_one_competitor(norm):
  w, b, logits_fn = _affine(6, 10, seed=3)
  x = np.random.RandomState(2).rand(12, 10).astype(np.float32)
  f = logits_fn(x)
  order = np.argsort(-f, axis=1)
  y, top = order[:, 1], order[:, 0]  # y second: exactly one class (top) scores above it.
  res = deepfool(logits_fn, x, y, norm=norm, num_candidates=6)
  expected = -(f[np.arange(12), top] - f[np.arange(12), y]) / np.linalg.norm(
    w[:, top] - w[:, y], DUAL[norm], axis=0
  )
  np.testing.assert_allclose(res.margin, expected, rtol=1e-4)
  assert (res.margin < 0).all() and res.converged.all()
  np.testing.assert_array_equal(np.argmax(logits_fn(x + res.perturbation), axis=1), y)


def _mlp(seed, dim=6, hidden=16, num_classes=5):
  """A smooth, well-conditioned nonlinear classifier: affine plus a tanh layer."""
  rs = np.random.RandomState(seed)
  a = rs.randn(dim, num_classes).astype(np.float32)
  w1 = rs.randn(dim, hidden).astype(np.float32)
  w2 = rs.randn(hidden, num_classes).astype(np.float32) / 2
  return lambda v: v @ a + jnp.tanh(v @ w1) @ w2


def _reference_deepfool(logits_fn, x, y, norm, max_iter, overshoot=0.02):
  """One example at a time, all classes, full Jacobian: the documented rule in NumPy."""
  jac = jax.jit(jax.jacrev(lambda v: logits_fn(v[None])[0]))
  margins, iters = [], []
  q = DUAL[norm]
  for x0, yi in zip(x.astype(np.float64), y, strict=True):
    r, total = np.zeros_like(x0), np.zeros_like(x0)
    correct = None
    it = 0
    for t in range(max_iter + 1):
      xt = (x0 + (1 + overshoot) * total).astype(np.float32)
      f = np.asarray(logits_fn(xt[None])[0], np.float64)
      pred_ok = np.argmax(f) == yi
      if t == 0:
        correct = pred_ok
      elif pred_ok != correct:
        break
      if t == max_iter:
        break
      g = np.asarray(jac(xt), np.float64)
      others = [k for k in range(len(f)) if k != yi]
      fd = np.array([f[k] - f[yi] for k in others])
      wd = np.array([g[k] - g[yi] for k in others])
      wn = np.linalg.norm(wd, q, axis=1)
      dist = np.abs(fd) / (wn + 1e-12)
      if correct:
        best = int(np.argmin(dist))
        sgn = 1.0
      else:
        best = int(np.argmax(np.where(fd > 0, dist, -np.inf)))
        sgn = -1.0
      u = wd[best] / (wn[best] + 1e-12) if norm == 'l2' else np.sign(wd[best])
      r += sgn * dist[best] * u
      total += sgn * (dist[best] + 1e-4) * u
      it += 1
    size = np.linalg.norm(r, PRIMAL[norm])
    margins.append(size if correct else -size)
    iters.append(it)
  return np.array(margins), np.array(iters)


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_nonlinear_matches_reference_and_all_candidates(norm):
  logits_fn = _mlp(0)
  x = np.random.RandomState(0).randn(24, 6).astype(np.float32)
  f = np.asarray(logits_fn(x))
  y = np.argmax(f, axis=1)
  y[::3] = np.argsort(-f[::3], axis=1)[:, 2]  # Some misclassified examples (y ranked third).
  run = jax.jit(
    lambda x, y, n: deepfool(logits_fn, x, y, norm=norm, max_iter=20, num_candidates=n),
    static_argnums=2,
  )
  full = run(x, y, 5)
  ref_margin, ref_iters = _reference_deepfool(logits_fn, x, y, norm, max_iter=20)
  np.testing.assert_array_equal(full.iterations, ref_iters)
  np.testing.assert_allclose(full.margin, ref_margin, rtol=1e-4, atol=1e-6)
  assert full.converged.all() and (full.iterations > 1).any()
  assert ((full.margin < 0) == (np.arange(24) % 3 == 0)).all()
  # More candidates than classes means all classes.
  chex.assert_trees_all_equal(run(x, y, 50), full)


def test_fewer_candidates_never_find_a_closer_affine_boundary():
  w, b, logits_fn = _affine(10, 8, seed=5)
  x = np.random.RandomState(4).rand(64, 8).astype(np.float32)
  y = np.argmax(logits_fn(x), axis=1)
  full = deepfool(logits_fn, x, y, num_candidates=10)
  few = deepfool(logits_fn, x, y, num_candidates=3)
  assert (np.asarray(few.margin) >= np.asarray(full.margin) * (1 - 1e-5)).all()
  assert (np.asarray(few.margin) > np.asarray(full.margin) * 1.001).any()


def test_converged_examples_stop_changing_and_unconverged_are_reported():
  logits_fn = _mlp(1)
  x = np.random.RandomState(3).randn(32, 6).astype(np.float32)
  y = np.argmax(np.asarray(logits_fn(x)), axis=1)
  run = jax.jit(functools.partial(deepfool, logits_fn), static_argnames='max_iter')
  long = run(x, y, max_iter=30)
  assert long.converged.all() and (long.iterations >= 2).any()
  short = run(x, y, max_iter=1)
  done = np.asarray(long.iterations) <= 1
  np.testing.assert_array_equal(short.converged, done)
  np.testing.assert_array_equal(short.iterations, np.minimum(long.iterations, 1))
  for field in ('margin', 'perturbation'):
    np.testing.assert_array_equal(
      np.asarray(getattr(short, field))[done], getattr(long, field)[done]
    )
  # Not converged: the distance reached so far, smaller than the converged margin.
  assert (np.abs(short.margin)[~done] < np.abs(long.margin)[~done]).all()
  assert (np.asarray(short.margin)[~done] > 0).all()


def test_flat_model_stops_unconverged_with_zero_margin():
  # Example 0 sits where every logit is flat (a dead ReLU); example 1 does not.
  w = np.array([[1.0, -1.0, 0.5]], np.float32)
  logits_fn = lambda v: jax.nn.relu(v) @ w + jnp.array([0.0, 0.1, 0.2])
  x = np.array([[-1.0], [2.0]], np.float32)
  y = np.argmax(np.asarray(logits_fn(x)), axis=1)
  res = deepfool(logits_fn, x, y, num_candidates=3, max_iter=50)
  np.testing.assert_array_equal(res.converged, [False, True])
  np.testing.assert_array_equal(res.iterations[0], 0)
  assert res.margin[0] == 0 and res.margin[1] > 0


def test_bad_arguments_raise():
  _, _, logits_fn = _affine(3, 4, seed=0)
  x, y = np.zeros((2, 4), np.float32), np.zeros(2, np.int32)
  with pytest.raises(ValueError, match='num_candidates'):
    deepfool(logits_fn, x, y, num_candidates=1)
  with pytest.raises(ValueError, match='norm'):
    deepfool(logits_fn, x, y, norm='l1')


def test_clip_keeps_iterates_in_the_box():
  w, b, logits_fn = _affine(4, 16, seed=7)
  x = np.random.RandomState(5).rand(32, 16).astype(np.float32)
  x[:, :8] = np.round(x[:, :8])  # Half the coordinates on the box faces, so clipping binds.
  y = np.argmax(logits_fn(x), axis=1)
  free = deepfool(logits_fn, x, y, num_candidates=4)
  boxed = deepfool(logits_fn, x, y, num_candidates=4, clip=(0.0, 1.0))
  x_adv = x + np.asarray(boxed.perturbation)
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  # Clipping only removes length: the box-projected margin never exceeds the free one
  # in the first step, and it needs more steps where the box binds.
  first = np.asarray(boxed.iterations) == 1
  assert (np.asarray(boxed.margin)[first] <= np.asarray(free.margin)[first] * (1 + 1e-5)).all()
  assert (np.asarray(boxed.iterations) > 1).any()
  flipped = np.argmax(logits_fn(x_adv), axis=1) != y
  np.testing.assert_array_equal(flipped, boxed.converged)


def test_bfloat16_model_gives_float32_results():
  w, b, _ = _affine(5, 8, seed=2)
  logits_fn = lambda v: (v.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.bfloat16)
  x = np.random.RandomState(6).rand(8, 8).astype(np.float32)
  y = np.argmax(np.asarray(logits_fn(x), np.float32), axis=1)
  res = deepfool(logits_fn, x, y, num_candidates=5)
  chex.assert_type([res.margin, res.perturbation], jnp.float32)
  assert res.converged.all()


def test_batch_invariance():
  logits_fn = _mlp(2)
  x = np.random.RandomState(7).randn(16, 6).astype(np.float32)
  y = np.argmax(np.asarray(logits_fn(x)), axis=1)
  whole = deepfool(logits_fn, x, y)
  part = deepfool(logits_fn, x[5:9], y[5:9])
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[5:9], whole), part, rtol=1e-6, atol=1e-7)


def test_sharded_equals_single_device():
  logits_fn = _mlp(3)
  x = np.random.RandomState(8).randn(32, 6).astype(np.float32)
  y = np.argmax(np.asarray(logits_fn(x)), axis=1)
  y[::4] = (y[::4] + 1) % 5
  fn = functools.partial(deepfool, logits_fn, max_iter=20)
  single = jax.jit(fn)(x, y)
  mesh = parallel.make_mesh()
  assert parallel.num_devices(mesh) == 4
  sharding = parallel.data_sharding(mesh)
  xs, ys = jax.device_put(x, sharding), jax.device_put(y, sharding)
  global_loop = jax.jit(fn)(xs, ys)
  per_device = jax.jit(parallel.per_device(fn, mesh, num_batched_args=2))(xs, ys)
  # Each device refills its own 3 slots from its 8 examples.
  slots = functools.partial(fn, batch_size=3)
  per_device_slots = jax.jit(parallel.per_device(slots, mesh, num_batched_args=2))(xs, ys)
  for res in (global_loop, per_device, per_device_slots):
    np.testing.assert_array_equal(res.iterations, single.iterations)
    np.testing.assert_array_equal(res.converged, single.converged)
    np.testing.assert_allclose(res.margin, single.margin, rtol=1e-6)
    np.testing.assert_allclose(res.perturbation, single.perturbation, rtol=1e-5, atol=1e-7)


def test_slots_refilled_from_the_queue_equal_one_batch():
  logits_fn = _mlp(9)
  x = 2 * np.random.RandomState(9).randn(23, 6).astype(np.float32)
  f = np.asarray(logits_fn(x))
  y = np.argmax(f, axis=1)
  y[::4] = np.argsort(-f[::4], axis=1)[:, 1]
  run = jax.jit(
    lambda x, y, b: deepfool(logits_fn, x, y, max_iter=3, batch_size=b), static_argnums=2
  )
  whole = run(x, y, None)
  assert len(np.unique(whole.iterations)) == 3 and not whole.converged.all()
  for b in (
    1,
    4,
  ):  # 23 examples through 4 slots: every slot is refilled, the last batch is partial.
    slotted = run(x, y, b)
    np.testing.assert_array_equal(slotted.iterations, whole.iterations)
    np.testing.assert_array_equal(slotted.converged, whole.converged)
    np.testing.assert_allclose(slotted.margin, whole.margin, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(slotted.perturbation, whole.perturbation, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='max_iter'):
    deepfool(logits_fn, x, y, max_iter=0)
