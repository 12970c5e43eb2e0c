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
  `num_candidates` classes, as in foolbox and the LTS4 code), so the backward
  work per step does not grow with the number of classes K (except in the last
  layer): a 21k-class model needs num_candidates - 1 backward passes, not 21k.
  The convergence test uses all K classes.
* An example that has not converged within `max_iter` steps has
  `converged=False`; its margin is the signed distance reached so far (a partial
  estimate, usually smaller in magnitude than the converged one). The same holds
  for an example DeepFool cannot move: every candidate's gradient difference is
  zero (a flat region), or, when misclassified, no candidate class scores above
  y although the prediction is not y (a non-candidate class wins). It stops at
  once with `converged=False` rather than spending the remaining iterations.
  Callers decide how to treat those examples (e.g. rank them as most robust).

Cost: every step runs one `jax.vjp` of the model (a forward pass) whose candidate
gradients come from one vmapped backward pass over the num_candidates - 1
cotangents e_k - e_y, and one forward pass at the new iterate that decides
whether the example is done. With `batch_size` smaller than the number of
examples, a finished example frees its slot for the next one, so the work per
example follows its own number of steps, not the slowest example's.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from puma_jax import vma
from puma_jax.attacks import lp

# Added to each step's distance, as in the original DeepFool code and foolbox.
_STABILITY = 1e-4
NORMS = lp.NORMS


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


class _Slots(NamedTuple):
  """The examples being iterated, one per slot (B slots)."""

  example: jax.Array  # i32[B], index into x; N marks an empty slot.
  x: jax.Array  # f32[B,...], the example's input.
  y: jax.Array  # i32[B]
  steps: jax.Array  # i32[B], DeepFool steps taken.
  iterate_sum: jax.Array  # f32[B,...], sum of the steps with the stability term.
  r: jax.Array  # f32[B,...], sum of the linearised distances d_l * u(w_l).
  competitors: jax.Array  # i32[B,C-1], candidate classes other than y.
  correct: jax.Array  # bool[B], predicted y at x.


class _State(NamedTuple):
  slots: _Slots
  next_example: jax.Array  # i32[], the next example to load into a free slot.
  result: DeepFoolResult  # Arrays over all N examples, written when an example finishes.


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
  batch_size: int | None = None,
) -> DeepFoolResult:
  """Signed DeepFool margins of N examples; see the module docstring for the semantics.

  The examples run through `batch_size` slots inside one `lax.while_loop`. Each
  iteration linearises the model at every slot's iterate with one `jax.vjp` (one
  forward pass) and gets the gradients of all candidate logit differences from
  that one VJP with the candidate cotangents vmapped; after the step, one forward
  pass at the new iterates tells which examples have flipped. A finished example
  (flipped, `max_iter` steps, or unable to move) leaves its slot at once and the
  next example takes it, so no backward pass is spent on finished examples and a
  slow example does not hold up the others. The loop ends when every example has
  finished. Each example's result depends only on that example. Pure; usable
  under jit, vmap and shard_map (`parallel.per_device` gives every device its own
  loop); computes in float32 whatever the model's dtype.

  Args:
    logits_fn: maps f32[B,...] inputs to logits [B,K] (any float dtype); example b's
      logits must depend only on input b (e.g. BatchNorm in eval mode).
    x: f32[N,...] inputs, e.g. images f32[N,H,W,C] in [0,1].
    y: i32[N] labels in [0, K).
    norm: 'l2' or 'linf'.
    num_candidates: classes considered per example, y included (>= 2; capped at K).
    overshoot: the iterate is x + (1 + overshoot) * (sum of steps).
    max_iter: maximum number of DeepFool steps per example (>= 1).
    clip: optional (lo, hi) bounds for every iterate, e.g. (0., 1.) for images.
    batch_size: number of slots, i.e. the batch the model sees (default: all N at
      once). Smaller batches refill freed slots. The candidates' backward pass runs
      on (num_candidates - 1) x batch_size rows: on a 2-core CPU batches of 4-8 were
      fastest; on accelerators use the largest batch that fits.

  Returns:
    `DeepFoolResult(margin f32[N], perturbation f32[N,...], iterations i32[N],
    converged bool[N])`.
  """
  lp.check_norm(norm)
  if num_candidates < 2:
    raise ValueError(
      f'deepfool: num_candidates must be >= 2 (the label and at least one other class), '
      f'got {num_candidates}'
    )
  if max_iter < 1:
    raise ValueError(f'deepfool: max_iter must be >= 1, got {max_iter}')
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  n = x.shape[0]
  if y.shape != (n,):
    raise ValueError(f'deepfool: y has shape {y.shape}, expected ({n},) to match x')
  if batch_size is not None and batch_size < 1:
    raise ValueError(f'deepfool: batch_size must be >= 1, got {batch_size}')
  b = n if batch_size is None else min(batch_size, n)
  logits_fn32 = lambda v: logits_fn(v).astype(jnp.float32)
  logits_shape = jax.eval_shape(logits_fn32, x[:b]).shape
  if len(logits_shape) != 2 or logits_shape[0] != b:
    raise ValueError(f'deepfool: logits_fn must return [B, K] logits, got {logits_shape}')
  num_classes = logits_shape[1]
  num_competitors = min(num_candidates, num_classes) - 1
  if num_competitors < 1:
    raise ValueError(f'deepfool: the model has {num_classes} class(es); DeepFool needs >= 2')

  expand = lambda v: lp.expand(v, x)
  apply_clip = (lambda v: v) if clip is None else (lambda v: jnp.clip(v, clip[0], clip[1]))

  def iterate(s: _Slots, iterate_sum: jax.Array) -> jax.Array:
    return apply_clip(s.x + (1.0 + overshoot) * iterate_sum)

  def step(s: _Slots, correct, f_diff: jax.Array, grads: jax.Array):
    """One DeepFool step from f_diff f32[B,C-1] = f_k - f_y and grads f32[C-1,B,...]."""
    w_norm = jax.vmap(lambda g: lp.dual_norm(g, norm))(grads).T  # [B,C-1]
    dist = jnp.abs(f_diff) / (w_norm + lp.TINY)
    # Correct: the closest boundary. Misclassified: the farthest boundary among the
    # classes still above y (inf marks a class with nothing to fix).
    key = jnp.where(correct[:, None], dist, jnp.where(f_diff > 0, -dist, jnp.inf))
    best = jnp.argmin(key, axis=1)
    rows = jnp.arange(b)
    d, best_norm, w = dist[rows, best], w_norm[rows, best], grads[best, rows]
    movable = jnp.isfinite(key[rows, best]) & (best_norm > 0) & jnp.isfinite(d)
    u = w / expand(best_norm + lp.TINY) if norm == 'l2' else jnp.sign(w)
    u = u * expand(jnp.where(correct, 1.0, -1.0))
    moving = expand(movable)
    r = s.r + jnp.where(moving, expand(d) * u, 0.0)
    iterate_sum = s.iterate_sum + jnp.where(moving, expand(d + _STABILITY) * u, 0.0)
    return r, iterate_sum, movable

  def body(state: _State) -> _State:
    s = state.slots
    active = s.example < n
    logits, vjp_fn = jax.vjp(logits_fn32, iterate(s, s.iterate_sum))
    first = s.steps == 0
    competitors = jnp.where(
      first[:, None], _top_competitors(logits, s.y, num_competitors), s.competitors
    )
    correct = jnp.where(first, jnp.argmax(logits, axis=1) == s.y, s.correct)
    f_y = jnp.take_along_axis(logits, s.y[:, None], axis=1)
    f_diff = jnp.take_along_axis(logits, competitors, axis=1) - f_y  # [B,C-1]
    # Cotangent e_k - e_y for each competitor k: one VJP, vmapped over the candidates.
    cot = jax.nn.one_hot(competitors.T, num_classes) - jax.nn.one_hot(s.y, num_classes)
    (grads,) = jax.vmap(vjp_fn)(cot)  # [C-1,B,...]
    r, iterate_sum, moved = step(s, correct, f_diff, grads)
    steps = s.steps + moved.astype(jnp.int32)
    x_next = iterate(s, iterate_sum)
    flipped = (jnp.argmax(logits_fn32(x_next), axis=1) == s.y) != correct
    done = active & (flipped | ~moved | (steps >= max_iter))

    # Write the finished examples' results (index n is dropped).
    out = jnp.where(done, s.example, n)
    delta = apply_clip(s.x + r) - s.x if clip is not None else r
    margin = jnp.where(correct, 1.0, -1.0) * lp.lp_norm(delta, norm)
    res = state.result
    res = DeepFoolResult(
      margin=res.margin.at[out].set(margin, mode='drop'),
      perturbation=res.perturbation.at[out].set(x_next - s.x, mode='drop'),
      iterations=res.iterations.at[out].set(steps, mode='drop'),
      converged=res.converged.at[out].set(flipped, mode='drop'),
    )

    # Refill the freed slots with the next examples, in slot order.
    new = state.next_example + jnp.cumsum(done) - 1
    example = jnp.where(done, jnp.where(new < n, new, n), s.example)
    refill = done & (example < n)
    load = jnp.minimum(example, n - 1)
    keep = lambda old, fresh: jnp.where(expand(refill) if old.ndim > 1 else refill, fresh, old)
    slots = _Slots(
      example=example,
      x=keep(s.x, x[load]),
      y=keep(s.y, y[load]),
      steps=jnp.where(done, 0, steps),
      iterate_sum=jnp.where(expand(done), 0.0, iterate_sum),
      r=jnp.where(expand(done), 0.0, r),
      competitors=competitors,
      correct=correct,
    )
    next_example = jnp.minimum(state.next_example + jnp.sum(done), n)
    return _State(slots, next_example, res)

  def cond(state: _State) -> jax.Array:
    return jnp.any(state.slots.example < n)

  init = _State(
    slots=_Slots(
      example=jnp.arange(b, dtype=jnp.int32),
      x=x[:b],
      y=y[:b],
      steps=jnp.zeros((b,), jnp.int32),
      iterate_sum=jnp.zeros_like(x[:b]),
      r=jnp.zeros_like(x[:b]),
      competitors=jnp.zeros((b, num_competitors), jnp.int32),
      correct=jnp.zeros((b,), bool),
    ),
    next_example=jnp.asarray(b, jnp.int32),
    result=DeepFoolResult(
      margin=jnp.zeros((n,), jnp.float32),
      perturbation=jnp.zeros_like(x),
      iterations=jnp.zeros((n,), jnp.int32),
      converged=jnp.zeros((n,), bool),
    ),
  )
  # Inside jax.shard_map the constants of the carry vary per device like the examples.
  return jax.lax.while_loop(cond, body, vma.vary_like(init, x)).result


def _top_competitors(logits: jax.Array, y: jax.Array, num: int) -> jax.Array:
  """The `num` classes k != y with the largest logits, i32[B,num]."""
  masked = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
  return jax.lax.top_k(masked, num)[1].astype(jnp.int32)
