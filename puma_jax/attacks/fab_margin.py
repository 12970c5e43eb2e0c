"""Signed minimum-norm margins from untargeted FAB (Croce and Hein 2020), with restarts.

`fab_margin(logits_fn, x, y)` runs FAB's iteration (see `attacks.fab`) without a
target class: every step linearises the candidate logit differences
f'_k = f_k - f_y at the iterate x1 and picks the boundary as DeepFool does
(`first_order.choose_boundary`):

* correctly classified: the closest linearised boundary; success is any
  prediction other than y, and the margin is +||x_best - x||;
* misclassified: the farthest linearised boundary among the classes still above
  y; success is the prediction y (a helpful perturbation), and the margin is
  -||x_best - x||, the same sign convention as DeepFool's margin.

Both x1 and the clean input x0 are projected onto that hyperplane inside the
box [0, 1] (`fab.project_onto_boundary`), and the iterate moves to
clip((x1 + eta d1)(1 - alpha) + (x0 + eta d2) alpha), alpha = min(|d1| / (|d1| +
|d2|), alpha_max); a successful iterate is recorded when it is the smallest so
far and pulled back to x0 + beta (x1 - x0). Restart 0 starts at x; restart r > 0
starts at a random point at distance min(best, d0) / 2 from x (d0: the first
linearised distance at x, used while nothing has been found), as FAB's restarts
do. FAB runs its whole budget (it keeps shrinking the perturbation), so the cost
is `restarts * num_steps` steps of one forward pass, one backward pass vmapped
over the candidates and one more forward pass each, for every example.

The result is an upper bound on the distance to the boundary (up to float
rounding): the recorded point does change the prediction. An example where FAB
finds no such point has `converged=False` and margin +inf (correct) or -inf
(misclassified): "beyond what the budget could reach".

Randomness: each example's restarts draw from a key folded from `seed` and a hash
of the example's own pixels, so its result depends only on that example (not on
its position in the batch, the batch size or the device), and reruns agree.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from puma_jax.attacks import first_order, lp
from puma_jax.attacks.fab import project_onto_boundary


class FABMarginResult(NamedTuple):
  """Output of `fab_margin` for B examples.

  Attributes:
    margin: f32[B] signed distance of the smallest successful point (+-inf if none).
    converged: bool[B], a successful point was found.
    iterations: i32[B], the step (counted over all restarts, from 1) that found it; 0 if none.
  """

  margin: jax.Array
  converged: jax.Array
  iterations: jax.Array


def example_keys(seed: int, x: jax.Array) -> jax.Array:
  """key[B]: `seed` folded with a hash of each example's float32 bits (position-free)."""
  flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(flat, jnp.uint32)
  mult = (np.arange(flat.shape[1], dtype=np.uint64) * 2654435761 + 1) % 2**32
  h = jnp.sum(bits * jnp.asarray(mult, jnp.uint32), axis=1, dtype=jnp.uint32)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), h)


def fab_margin(
  logits_fn: Callable[[jax.Array], jax.Array],
  x: jax.Array,
  y: jax.Array,
  *,
  norm: str = 'linf',
  num_candidates: int = 10,
  num_steps: int = 20,
  restarts: int = 2,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
  seed: int = 0,
) -> FABMarginResult:
  """Signed FAB margins of B examples in the box [0, 1]; see the module docstring.

  Args:
    logits_fn: f32[B,...] -> [B,K] logits; example b's logits depend only on input b.
    x: f32[B,...] inputs in [0, 1].
    y: i32[B] labels in [0, K).
    norm: 'linf' or 'l2'.
    num_candidates: classes considered per step, y included (>= 2; capped at K): y
      and the classes with the largest logits at x.
    num_steps: FAB steps per restart (>= 1).
    restarts: runs per example (>= 1); the first starts at x, the others at random points.
    alpha_max, eta, beta: FAB's bias towards x, overshoot and pull-back factor.
    seed: the restarts' randomness (see the module docstring).

  Returns:
    `FABMarginResult(margin f32[B], converged bool[B], iterations i32[B])`. Pure;
    jit- and shard_map-able; computes in float32.
  """
  lp.check_norm(norm)
  if num_candidates < 2:
    raise ValueError(f'fab_margin: num_candidates must be >= 2, got {num_candidates}')
  if num_steps < 1 or restarts < 1:
    raise ValueError(
      f'fab_margin: num_steps and restarts must be >= 1, got {num_steps} and {restarts}'
    )
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  batch, shape = x.shape[0], x.shape
  fn32 = lambda v: logits_fn(v.reshape(shape)).astype(jnp.float32)
  num_classes = jax.eval_shape(fn32, x).shape[-1]
  if num_classes < 2:
    raise ValueError(f'fab_margin: the model has {num_classes} class(es); need >= 2')
  x0 = x.reshape(batch, -1)
  rows = jnp.arange(batch)

  logits0, vjp0 = jax.vjp(fn32, x0)
  competitors = first_order.top_competitors(logits0, y, min(num_candidates, num_classes) - 1)
  correct = jnp.argmax(logits0, axis=1) == y
  f0, g0 = first_order.candidate_gradients(logits0, vjp0, y, competitors)
  _, d0, movable0 = first_order.choose_boundary(f0, g0, correct, norm)
  d0 = jnp.where(movable0, d0, 0.0)
  keys = example_keys(seed, x)

  def success(z):
    return (jnp.argmax(fn32(z), axis=1) == y) != correct

  def step(i, s):
    x1, best_dist, found_at = s
    logits, vjp_fn = jax.vjp(fn32, x1)
    f_diff, grads = first_order.candidate_gradients(logits, vjp_fn, y, competitors)
    pick, _, movable = first_order.choose_boundary(f_diff, grads, correct, norm)
    w, f = grads[pick, rows], f_diff[rows, pick]
    b = jnp.sum(w * x1, axis=-1) - f  # the linearised boundary w.z = b
    d = project_onto_boundary(
      jnp.concatenate([x1, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]), norm
    )
    d1, d2 = d[:batch], d[batch:]
    a1 = jnp.maximum(lp.lp_norm(d1, norm), 1e-8)
    a2 = jnp.maximum(lp.lp_norm(d2, norm), 1e-8)
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
    x_new = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
    x_new = jnp.where(movable[:, None], x_new, x1)
    hit = success(x_new)
    dist = lp.lp_norm(x_new - x0, norm)
    better = hit & (dist < best_dist)
    x1 = jnp.where(hit[:, None], x0 + beta * (x_new - x0), x_new)
    return (
      x1,
      jnp.where(better, dist, best_dist),
      jnp.where(better, i + 1, found_at),
    )

  def restart(r, s):
    _, best_dist, found_at = s
    radius = 0.5 * jnp.minimum(best_dist, d0)
    start = lp.random_on_sphere(lp.fold_in_each(keys, r), x, radius, norm).reshape(batch, -1)
    x1 = jnp.where(r == 0, x0, start)
    return jax.lax.fori_loop(r * num_steps, (r + 1) * num_steps, step, (x1, best_dist, found_at))

  init = (x0, jnp.full((batch,), jnp.inf), jnp.zeros((batch,), jnp.int32))
  _, best_dist, found_at = jax.lax.fori_loop(0, restarts, restart, init)
  converged = jnp.isfinite(best_dist)
  return FABMarginResult(
    margin=jnp.where(correct, 1.0, -1.0) * best_dist, converged=converged, iterations=found_at
  )
