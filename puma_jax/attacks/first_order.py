"""First-order margins: DeepFool's first linearisation, with no loop.

`first_order_margin(logits_fn, x, y)` linearises the model once, at x. With
f'_k = f_k - f_y and w_k = grad f'_k for the candidate classes k != y, and
||.||_q the dual norm (q = 2 for L2, q = 1 for L-infinity), the linearised
distance to class k's boundary is d_k = |f'_k| / ||w_k||_q and

* correctly classified: margin = +min_k d_k (the closest boundary);
* misclassified: margin = -max d_k over the classes still above y (f'_k > 0),
  the constraint that needs the longest move to make y the prediction.

This is exactly the distance of DeepFool's first step (`attacks.deepfool` with
`max_iter=1`, the same candidates and the same sign), so the two agree wherever
the model is affine: for an affine classifier (every class a candidate, no
binding box) the margin is the exact distance to the nearest boundary,
min_k (f_y - f_k) / ||w_y - w_k||_q, and for a misclassified example with one
class above y, minus the exact distance to the boundary with that class.

Candidates are y and the `num_candidates - 1` other classes with the largest
logits at x, as in DeepFool. With `clip=(lo, hi)` the margin is the norm of the
box-projected step, ||clip(x + d_l u_l) - x||_p, as DeepFool measures it.

Cost: one `jax.vjp` of the model (one forward pass) and one backward pass vmapped
over the num_candidates - 1 cotangents e_k - e_y. No loop, no convergence test:
`converged` is False only where the linearisation cannot move the example (every
candidate's gradient difference is zero, or, when misclassified, no candidate
scores above y because a non-candidate class wins).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from puma_jax.attacks import lp

# Added to the dual norms before dividing, as in DeepFool.
_TINY = 1e-8


class FirstOrderResult(NamedTuple):
  """Output of `first_order_margin` for B examples.

  Attributes:
    margin: f32[B] signed margin (positive: predicted y; negative: misclassified).
    converged: bool[B], False where the linearisation cannot move the example.
  """

  margin: jax.Array
  converged: jax.Array


def top_competitors(logits: jax.Array, y: jax.Array, num: int) -> jax.Array:
  """The `num` classes k != y with the largest logits, i32[B,num] (DeepFool's candidates)."""
  masked = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
  return jax.lax.top_k(masked, num)[1].astype(jnp.int32)


def candidate_gradients(
  logits: jax.Array, vjp_fn: Callable, y: jax.Array, competitors: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """f'_k = f_k - f_y and grad f'_k for the candidates, from one VJP vmapped over them.

  Args:
    logits: f32[B,K] logits at the linearisation point.
    vjp_fn: the VJP of the logits there (`jax.vjp(logits_fn, x)[1]`).
    y: i32[B] labels.
    competitors: i32[B,C] candidate classes (!= y).

  Returns:
    (f_diff f32[B,C], grads f32[C,B,...]).
  """
  num_classes = logits.shape[1]
  f_y = jnp.take_along_axis(logits, y[:, None], axis=1)
  f_diff = jnp.take_along_axis(logits, competitors, axis=1) - f_y
  cot = jax.nn.one_hot(competitors.T, num_classes) - jax.nn.one_hot(y, num_classes)
  (grads,) = jax.vmap(vjp_fn)(cot)
  return f_diff, grads


def choose_boundary(
  f_diff: jax.Array, grads: jax.Array, correct: jax.Array, norm: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """DeepFool's choice of the linearised boundary to move to.

  Args:
    f_diff: f32[B,C] f_k - f_y for the candidates.
    grads: f32[C,B,...] their gradients.
    correct: bool[B], the example is predicted y (else: make y the prediction).
    norm: 'linf' or 'l2' (the dual norm is L1 or L2).

  Returns:
    (best i32[B] candidate position, distance f32[B] d_best, movable bool[B]).
  """
  q = 1 if lp.check_norm(norm) == 'linf' else 2
  flat = grads.reshape(grads.shape[0], grads.shape[1], -1)
  w_norm = jnp.linalg.norm(flat, ord=q, axis=-1).T  # [B,C]
  dist = jnp.abs(f_diff) / (w_norm + _TINY)
  key = jnp.where(correct[:, None], dist, jnp.where(f_diff > 0, -dist, jnp.inf))
  best = jnp.argmin(key, axis=1)
  rows = jnp.arange(f_diff.shape[0])
  d = dist[rows, best]
  movable = jnp.isfinite(key[rows, best]) & (w_norm[rows, best] > 0) & jnp.isfinite(d)
  return best, d, movable


def first_order_margin(
  logits_fn: Callable[[jax.Array], jax.Array],
  x: jax.Array,
  y: jax.Array,
  *,
  norm: str = 'linf',
  num_candidates: int = 10,
  clip: tuple[float, float] | None = None,
) -> FirstOrderResult:
  """Signed first-order margins of B examples; see the module docstring.

  Args:
    logits_fn: f32[B,...] -> [B,K] logits; example b's logits depend only on input b.
    x: f32[B,...] inputs, e.g. images in [0, 1].
    y: i32[B] labels in [0, K).
    norm: 'linf' or 'l2'.
    num_candidates: classes considered, y included (>= 2; capped at K).
    clip: optional (lo, hi) box; the margin is then the norm of the box-projected step.

  Returns:
    `FirstOrderResult(margin f32[B], converged bool[B])`. Pure; jit- and shard_map-able.
  """
  lp.check_norm(norm)
  if num_candidates < 2:
    raise ValueError(f'first_order: num_candidates must be >= 2, got {num_candidates}')
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  num_classes = jax.eval_shape(logits_fn, x).shape[-1]
  if num_classes < 2:
    raise ValueError(f'first_order: the model has {num_classes} class(es); need >= 2')
  num_competitors = min(num_candidates, num_classes) - 1
  logits, vjp_fn = jax.vjp(lambda v: logits_fn(v).astype(jnp.float32), x)
  competitors = top_competitors(logits, y, num_competitors)
  f_diff, grads = candidate_gradients(logits, vjp_fn, y, competitors)
  correct = jnp.argmax(logits, axis=1) == y
  best, d, movable = choose_boundary(f_diff, grads, correct, norm)
  sign = jnp.where(correct, 1.0, -1.0)
  if clip is None:
    size = d
  else:
    w = grads[best, jnp.arange(x.shape[0])]
    if norm == 'l2':
      u = lp.normalize(w, 'l2')
    else:
      u = jnp.sign(w)
    step = lp.expand(sign * jnp.where(movable, d, 0.0), x) * u
    size = lp.lp_norm(jnp.clip(x + step, clip[0], clip[1]) - x, norm)
  margin = sign * jnp.where(movable, size, 0.0)
  return FirstOrderResult(margin=margin, converged=movable)
