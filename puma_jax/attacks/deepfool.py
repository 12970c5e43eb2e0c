"""Batched DeepFool (Moosavi-Dezfooli et al. 2016) giving signed, label-aware margins.

`deepfool(logits_fn, x, y)` estimates, for every example, the distance from x to
the decision boundary of its label y:

* if the model predicts y at x, `margin = +||r||` for the DeepFool estimate r of
  the smallest perturbation that changes the prediction (to any other class);
* if the model misclassifies x, `margin = -||r||` for the estimate of the
  smallest perturbation that makes y the prediction (a helpful perturbation).

The norm is L2, or L-infinity with the L1 dual norm in the linearised step (as in
foolbox's and DM-Improves-AT's L-infinity DeepFool).

Each iteration linearises the model at the current iterate x_t. With
f'_k = f_k - f_y and w_k = grad f'_k for the candidate classes k != y, and
||.||_q the dual norm (q = 2 for L2, q = 1 for L-infinity):

* correctly classified: l = argmin_k |f'_k| / ||w_k||_q (the closest boundary),
  and the step moves d_l = |f'_l| / ||w_l||_q along +u(w_l);
* misclassified: among the classes still above y (f'_k > 0), l = argmax_k
  f'_k / ||w_k||_q (the constraint that needs the longest move), and the step
  moves d_l along -u(w_l);

with u(w) = w / ||w||_2 (L2) or sign(w) (L-infinity), so that ||d u||_p = d. Two
sums are kept: `r`, the sum of the linearised distances d_l u, and the iterate's
sum, which adds 1e-4 per step to d_l (the stability term of the original code and
foolbox; without it a step that lands exactly on a boundary would never cross it).
The iterate is x_t = clip(x + (1 + overshoot) * iterate_sum). An example stops
(converges) as soon as its prediction at x_t (argmax over all K classes) flips:
to any class other than y if it started correct, to y if it started
misclassified.

Results:

* `margin` = +/-||r||_p, measured before the overshoot factor and without the
  stability term, so for an affine classifier (without binding clip bounds and
  with every class a candidate) it is exact after one iteration:
  min over k != y of (f_y - f_k) / ||w_y - w_k||_q for a correct example, and
  -(f_c - f_y) / ||w_c - w_y||_q for a misclassified one where only class c
  scores above y.
* `perturbation` = x_T - x for the final iterate x_T, overshoot and stability
  terms included (clipped when `clip` is given); for a converged example it does
  change the prediction as described above.
* When `clip=(lo, hi)` is given, every iterate is clipped to the box and the
  margin is the norm of the box-projected estimate, ||clip(x + r) - x||_p. The
  linearised steps ignore the box (as in the original algorithm and foolbox), so
  when the box binds this is the distance to DeepFool's boundary estimate pulled
  back into the box, not a certified bound; examples whose steps keep being
  clipped away may not converge.
* Candidates are the label y and the `num_candidates - 1` other classes with the
  largest logits at x (for a correctly classified example these are the top
  `num_candidates` classes, as in foolbox and the LTS4 code), so a 21k-class model
  costs the same per iteration as a 10-class one. The convergence test uses all K
  classes.
* An example that has not converged within `max_iter` steps has
  `converged=False`; its margin is the signed distance reached so far (a partial
  estimate, smaller in magnitude than the true DeepFool margin). The same holds
  for an example DeepFool cannot move: every candidate's gradient difference is
  zero (a flat region), or, when misclassified, no candidate class scores above
  y although the prediction is not y (a non-candidate class wins). It stops at
  once with `converged=False` rather than spending the remaining iterations.
  Callers decide how to treat those examples (e.g. rank them as most robust).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Added to each step's distance, as in the original DeepFool code and foolbox.
_STABILITY = 1e-4
# Added to the gradient norms before dividing, as in the original code and foolbox.
_TINY = 1e-8
NORMS = ('l2', 'linf')


class DeepFoolResult(NamedTuple):
  """Output of `deepfool` for a batch of B examples.

  Attributes:
    margin: f32[B], the signed margin (positive: predicted y; negative: misclassified).
    perturbation: f32[B,...] like x, the final iterate minus x (overshoot included).
    iterations: i32[B], the number of DeepFool steps taken by each example.
    converged: bool[B], whether the prediction flipped within `max_iter` steps.
  """

  margin: jax.Array
  perturbation: jax.Array
  iterations: jax.Array
  converged: jax.Array


class _State(NamedTuple):
  t: jax.Array  # i32[], number of forward passes done.
  iterate_sum: jax.Array  # f32[B,...], sum of the steps with the stability term.
  r: jax.Array  # f32[B,...], sum of the linearised distances d_l * u(w_l).
  competitors: jax.Array  # i32[B,C-1], candidate classes other than y.
  correct: jax.Array  # bool[B], predicted y at x.
  active: jax.Array  # bool[B], still iterating.
  converged: jax.Array  # bool[B]
  iterations: jax.Array  # i32[B]


def deepfool(
  logits_fn: Callable[[jax.Array], jax.Array],
  x: jax.Array,
  y: jax.Array,
  *,
  norm: str = 'l2',
  num_candidates: int = 10,
  overshoot: float = 0.02,
  max_iter: int = 50,
  clip: tuple[float, float] | None = None,
) -> DeepFoolResult:
  """Signed DeepFool margins of a batch; see the module docstring for the exact semantics.

  Each iteration runs one forward pass (`jax.vjp` of `logits_fn` at the iterates)
  and obtains the gradients of all candidate logit differences from that one VJP
  with the candidate cotangents vmapped. Examples stop by masking inside one
  `lax.while_loop`, which ends when every example has stopped or after `max_iter`
  steps (plus a final forward pass that checks the last step). Pure and
  jit/vmap/shard_map friendly; computes in float32.

  Args:
    logits_fn: maps f32[B,...] inputs to logits [B,K] (any float dtype); example b's
      logits must depend only on input b (e.g. BatchNorm in eval mode).
    x: f32[B,...] inputs, e.g. images f32[B,H,W,C] in [0,1].
    y: i32[B] labels in [0, K).
    norm: 'l2' or 'linf'.
    num_candidates: classes considered per example, y included (>= 2; capped at K).
    overshoot: the iterate is x + (1 + overshoot) * (sum of steps).
    max_iter: maximum number of DeepFool steps per example.
    clip: optional (lo, hi) bounds for every iterate, e.g. (0., 1.) for images.

  Returns:
    `DeepFoolResult(margin f32[B], perturbation f32[B,...], iterations i32[B],
    converged bool[B])`.
  """
  if norm not in NORMS:
    raise ValueError(f'deepfool: norm must be one of {NORMS}, got {norm!r}')
  if num_candidates < 2:
    raise ValueError(
      f'deepfool: num_candidates must be >= 2 (the label and at least one other class), '
      f'got {num_candidates}'
    )
  if max_iter < 0:
    raise ValueError(f'deepfool: max_iter must be >= 0, got {max_iter}')
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  batch = x.shape[0]
  if y.shape != (batch,):
    raise ValueError(f'deepfool: y has shape {y.shape}, expected ({batch},) to match x')
  logits_shape = jax.eval_shape(logits_fn, x)
  if len(logits_shape.shape) != 2 or logits_shape.shape[0] != batch:
    raise ValueError(f'deepfool: logits_fn must return [B, K] logits, got {logits_shape.shape}')
  num_classes = logits_shape.shape[1]
  num_competitors = min(num_candidates, num_classes) - 1
  if num_competitors < 1:
    raise ValueError(f'deepfool: the model has {num_classes} class(es); DeepFool needs >= 2')

  feature_axes = tuple(range(1, x.ndim))
  expand = lambda v: v.reshape(v.shape + (1,) * len(feature_axes))
  apply_clip = (lambda v: v) if clip is None else (lambda v: jnp.clip(v, clip[0], clip[1]))
  dual_norm = (
    (lambda g: jnp.sqrt(jnp.sum(g * g, axis=feature_axes)))
    if norm == 'l2'
    else (lambda g: jnp.sum(jnp.abs(g), axis=feature_axes))
  )

  def step(s: _State, correct, f_diff: jax.Array, grads: jax.Array, active: jax.Array):
    """One DeepFool step from f_diff f32[B,C-1] = f_k - f_y and grads f32[C-1,B,...]."""
    w_norm = jax.vmap(dual_norm)(grads).T  # [B,C-1]
    dist = jnp.abs(f_diff) / (w_norm + _TINY)
    # Correct: the closest boundary. Misclassified: the farthest boundary among the
    # classes still above y (inf marks a class with nothing to fix).
    key = jnp.where(correct[:, None], dist, jnp.where(f_diff > 0, -dist, jnp.inf))
    best = jnp.argmin(key, axis=1)
    rows = jnp.arange(batch)
    d, best_norm, w = dist[rows, best], w_norm[rows, best], grads[best, rows]
    movable = jnp.isfinite(key[rows, best]) & (best_norm > 0) & jnp.isfinite(d)
    u = w / expand(best_norm + _TINY) if norm == 'l2' else jnp.sign(w)
    u = u * expand(jnp.where(correct, 1.0, -1.0))
    moving = active & movable
    r = s.r + jnp.where(expand(moving), expand(d) * u, 0.0)
    iterate_sum = s.iterate_sum + jnp.where(expand(moving), expand(d + _STABILITY) * u, 0.0)
    return r, iterate_sum, moving, active & ~movable

  f32_logits_fn = lambda v: logits_fn(v).astype(jnp.float32)

  def body(s: _State) -> _State:
    x_t = apply_clip(x + (1.0 + overshoot) * s.iterate_sum)
    logits, vjp_fn = jax.vjp(f32_logits_fn, x_t)
    pred = jnp.argmax(logits, axis=1)
    first = s.t == 0
    competitors = jnp.where(first, _top_competitors(logits, y, num_competitors), s.competitors)
    correct = jnp.where(first, pred == y, s.correct)
    flipped = (pred == y) != correct  # Never at t = 0.
    converged = s.converged | (s.active & flipped)
    active = s.active & ~flipped
    f_y = jnp.take_along_axis(logits, y[:, None], axis=1)
    f_diff = jnp.take_along_axis(logits, competitors, axis=1) - f_y  # [B,C-1]

    def linearise_and_step(_):
      # Cotangent e_k - e_y for each competitor k: one VJP, vmapped over the candidates.
      cot = jax.nn.one_hot(competitors.T, num_classes) - jax.nn.one_hot(y, num_classes)
      (grads,) = jax.vmap(vjp_fn)(cot)  # [C-1,B,...]
      return step(s, correct, f_diff, grads, active)

    def no_step(_):
      return s.r, s.iterate_sum, jnp.zeros_like(active), jnp.zeros_like(active)

    r, iterate_sum, moved, stuck = jax.lax.cond(
      (s.t < max_iter) & jnp.any(active), linearise_and_step, no_step, None
    )
    return _State(
      t=s.t + 1,
      iterate_sum=iterate_sum,
      r=r,
      competitors=competitors,
      correct=correct,
      active=active & ~stuck,
      converged=converged,
      iterations=s.iterations + moved.astype(jnp.int32),
    )

  def cond(s: _State) -> jax.Array:
    return (s.t <= max_iter) & jnp.any(s.active)

  zeros_b = jnp.zeros((batch,), bool)
  init = _State(
    t=jnp.zeros((), jnp.int32),
    iterate_sum=jnp.zeros_like(x),
    r=jnp.zeros_like(x),
    competitors=jnp.zeros((batch, num_competitors), jnp.int32),
    correct=zeros_b,
    active=jnp.ones((batch,), bool),
    converged=zeros_b,
    iterations=jnp.zeros((batch,), jnp.int32),
  )
  s = jax.lax.while_loop(cond, body, init)
  r = apply_clip(x + s.r) - x if clip is not None else s.r
  size = (
    jnp.sqrt(jnp.sum(r * r, axis=feature_axes))
    if norm == 'l2'
    else jnp.max(jnp.abs(r), axis=feature_axes)
  )
  return DeepFoolResult(
    margin=jnp.where(s.correct, size, -size),
    perturbation=apply_clip(x + (1.0 + overshoot) * s.iterate_sum) - x,
    iterations=s.iterations,
    converged=s.converged,
  )


def _top_competitors(logits: jax.Array, y: jax.Array, num: int) -> jax.Array:
  """The `num` classes k != y with the largest logits, i32[B,num]."""
  masked = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
  return jax.lax.top_k(masked, num)[1].astype(jnp.int32)
