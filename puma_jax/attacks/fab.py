"""FAB, the Fast Adaptive Boundary attack (Croce and Hein 2020, "Minimally distorted
adversarial examples with a fast adaptive boundary attack"), targeted, L-infinity and L2.

FAB looks for the smallest perturbation that changes the decision. Each iteration
linearises the logit difference f = z_t - z_y at the current iterate x1, projects
both x1 and the clean input x0 onto the hyperplane {f_lin = 0} intersected with the
box [0, 1]^d (steps d1 and d2), and moves to the convex combination

  x1 <- clip((x1 + eta d1) (1 - alpha) + (x0 + eta d2) alpha, 0, 1),
  alpha = min(|d1| / (|d1| + |d2|), alpha_max),

which leans towards the clean input so the perturbation stays small. When x1 is
misclassified it is recorded if it is the smallest adversarial point so far, and
pulled back towards x0: x1 <- x0 + beta (x1 - x0). AutoAttack's FAB-T uses 100
iterations, alpha_max 0.1, eta 1.05, beta 0.9, no random restart, and the 9 classes
with the largest clean logits after the top one as targets. With `stop_on_success`
an example stops as soon as it has an adversarial point within eps (all AutoAttack
asks), and the loop ends when no example is left.

Targeted FAB needs one backward pass per iteration (the untargeted version needs the
gradient of every class, which does not scale to many classes; AutoAttack's standard
version only runs FAB-T).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from puma_jax.attacks import lp
from puma_jax.attacks.apgd import target_classes


class FABResult(NamedTuple):
  """Per-example outcome of `fab`.

  Attributes:
    x_adv: f32[B,...] the smallest adversarial point found (the input if none, or if
      the input is already misclassified).
    success: bool[B] an adversarial point with norm <= eps was found.
    distance: f32[B] its norm ||x_adv - x|| (0 if the input is misclassified, inf if
      nothing was found).
  """

  x_adv: jax.Array
  success: jax.Array
  distance: jax.Array


def project_onto_boundary(t: jax.Array, w: jax.Array, b: jax.Array, norm: str) -> jax.Array:
  """The smallest step from t onto the hyperplane w.z = b inside the box [0, 1]^D.

  Solves min ||d|| s.t. w.(t + d) = b, 0 <= t + d <= 1. With c = w.t - b >= 0 (after
  flipping the sign of w and b), the optimal step moves coordinate i against
  sign(w_i) by min(lam s_i, room_i), where room_i is its distance to the box face in
  that direction, s_i = 1 (L-infinity) or |w_i| (L2), and lam >= 0 solves the
  piecewise-linear, increasing equation
    sum_i |w_i| min(lam s_i, room_i) = c,
  found exactly by sorting the breakpoints room_i / s_i. When even the box corner
  does not reach the hyperplane (no solution), the corner itself is returned.

  Args:
    t: f32[N, D] points in [0, 1].
    w: f32[N, D] hyperplane normals.
    b: f32[N] offsets.
    norm: 'linf' or 'l2'.

  Returns:
    f32[N, D] steps d.
  """
  dim = t.shape[-1]
  c = jnp.sum(w * t, axis=-1) - b
  flip = jnp.where(c >= 0, 1.0, -1.0)
  w = w * flip[:, None]
  c = c * flip
  abs_w = jnp.abs(w)
  moves = abs_w > 0
  room = jnp.where(w > 0, t, 1.0 - t)
  if lp.check_norm(norm) == 'linf':
    speed = jnp.ones_like(w)
    slope = abs_w
  else:
    speed = abs_w
    slope = w * w
  # Breakpoint of coordinate i: the lam at which it reaches its box face.
  big = jnp.float32(1e30)
  brk = jnp.where(moves, jnp.minimum(room / jnp.where(moves, speed, 1.0), big), big)
  full = jnp.where(moves, abs_w * room, 0.0)  # its contribution once at the face
  brk_s, slope_s, full_s = jax.lax.sort((brk, slope, full), dimension=-1, num_keys=1)
  # Both running sums are accumulated from their own end, never as `total - cumsum`:
  # the coordinates that do not move (w_i = 0, breakpoint `big`) sort last, and their
  # slope sum must be exactly 0 there, since any rounding residue times `big` would
  # swamp the equation and pick the wrong segment.
  before = jnp.concatenate([jnp.zeros_like(full_s[:, :1]), jnp.cumsum(full_s[:, :-1], -1)], -1)
  after = jnp.flip(jnp.cumsum(jnp.flip(slope_s, -1), axis=-1), -1)  # slopes from k on
  reached = before + jnp.where(brk_s < big, brk_s * after, 0.0)  # the left side at lam = brk_k
  k = jnp.sum(reached < c[:, None], axis=-1)
  feasible = k < dim
  kk = jnp.minimum(k, dim - 1)[:, None]
  before_k = jnp.take_along_axis(before, kk, axis=-1)[:, 0]
  after_k = jnp.take_along_axis(after, kk, axis=-1)[:, 0]
  brk_k = jnp.take_along_axis(brk_s, kk, axis=-1)[:, 0]
  lam = jnp.where(after_k > 0, (c - before_k) / jnp.where(after_k > 0, after_k, 1.0), brk_k)
  lam = jnp.where(feasible, jnp.maximum(lam, 0.0), big)
  magnitude = jnp.where(moves, jnp.minimum(lam[:, None] * speed, room), 0.0)
  return -jnp.sign(w) * magnitude


def fab(
  logits_fn: Callable[[jax.Array], jax.Array],
  x: jax.Array,
  y: jax.Array,
  target: jax.Array,
  eps: float | jax.Array,
  *,
  norm: str,
  num_steps: int = 100,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
  active: jax.Array | None = None,
  stop_on_success: bool = True,
) -> FABResult:
  """Targeted FAB towards `target`: the smallest misclassifying perturbation it finds.

  Args:
    logits_fn: f32[B,...] -> f32[B,K], per-example independent.
    x: f32[B,...] in [0, 1].
    y: i32[B] labels.
    target: i32[B] target classes (!= y).
    eps: the radius that counts as success, a scalar or f32[B]. FAB itself is not
      bounded by it.
    norm: 'linf' or 'l2'.
    num_steps: iterations (two forward passes and one backward pass each).
    alpha_max, eta, beta: FAB's bias towards x0, overshoot and backward step.
    active: bool[B]; inactive examples are not attacked (default: all).
    stop_on_success: freeze an example once it has an adversarial point within eps
      (AutoAttack). False keeps shrinking the perturbation for the whole budget.

  Returns:
    A `FABResult`.
  """
  lp.check_norm(norm)
  batch = x.shape[0]
  x = x.astype(jnp.float32)
  x0 = x.reshape(batch, -1)
  eps = lp.batch_eps(eps, batch)
  active = jnp.ones((batch,), bool) if active is None else active.astype(bool)
  rows = jnp.arange(batch)

  def diff_and_grad(z):
    def total(z):
      logits = logits_fn(z.reshape(x.shape)).astype(jnp.float32)
      f = logits[rows, target] - logits[rows, y]
      return jnp.sum(f), f

    (_, f), g = jax.value_and_grad(total, has_aux=True)(z)
    return f, g

  def misclassified(z):
    return jnp.argmax(logits_fn(z.reshape(x.shape)), axis=-1) != y

  clean_wrong = misclassified(x0)
  state = dict(
    i=jnp.zeros((), jnp.int32),
    x1=x0,
    best=x0,
    dist=jnp.where(clean_wrong, 0.0, jnp.inf),
  )

  def live(s):
    done = stop_on_success & (s['dist'] <= eps)
    return active & ~clean_wrong & ~done

  def cond(s):
    return (s['i'] < num_steps) & jnp.any(live(s))

  def body(s):
    upd = live(s)
    x1 = s['x1']
    f, w = diff_and_grad(x1)
    b = jnp.sum(w * x1, axis=-1) - f
    d = project_onto_boundary(
      jnp.concatenate([x1, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]), norm
    )
    d1, d2 = d[:batch], d[batch:]
    a1 = jnp.maximum(lp.lp_norm(d1, norm), lp.TINY)
    a2 = jnp.maximum(lp.lp_norm(d2, norm), lp.TINY)
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
    x_new = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
    wrong = misclassified(x_new)
    dist = lp.lp_norm(x_new - x0, norm)
    better = upd & wrong & (dist < s['dist'])
    pulled_back = jnp.where(wrong[:, None], x0 + beta * (x_new - x0), x_new)
    return dict(
      i=s['i'] + 1,
      x1=jnp.where(upd[:, None], pulled_back, x1),
      best=jnp.where(better[:, None], x_new, s['best']),
      dist=jnp.where(better, dist, s['dist']),
    )

  s = jax.lax.while_loop(cond, body, state)
  return FABResult(
    x_adv=s['best'].reshape(x.shape),
    success=active & (s['dist'] <= eps),
    distance=s['dist'],
  )


def fab_targeted(
  logits_fn: Callable[[jax.Array], jax.Array],
  x: jax.Array,
  y: jax.Array,
  eps: float | jax.Array,
  *,
  norm: str,
  num_targets: int = 9,
  num_steps: int = 100,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
  active: jax.Array | None = None,
) -> FABResult:
  """FAB-T: one round of `fab` per target class, as AutoAttack runs it.

  Round r targets the (r+2)-th largest clean logit and attacks only the examples
  that no earlier round has broken within eps. `num_targets` is capped at K - 1.

  Args:
    logits_fn, x, y, eps, norm, num_steps, alpha_max, eta, beta, active: as in `fab`.
    num_targets: target classes tried per example (AutoAttack: 9).

  Returns:
    A `FABResult` holding, per example, the smallest adversarial point of all rounds
    that ran on it.
  """
  batch = x.shape[0]
  active = jnp.ones((batch,), bool) if active is None else active.astype(bool)
  targets = target_classes(logits_fn(x), num_targets)

  def round_(r, res):
    todo = active & ~res.success
    out = fab(
      logits_fn,
      x,
      y,
      targets[:, r],
      eps,
      norm=norm,
      num_steps=num_steps,
      alpha_max=alpha_max,
      eta=eta,
      beta=beta,
      active=todo,
    )
    better = todo & (out.distance < res.distance)
    return FABResult(
      x_adv=jnp.where(lp.expand(better, x), out.x_adv, res.x_adv),
      success=res.success | out.success,
      distance=jnp.where(better, out.distance, res.distance),
    )

  init = FABResult(x, jnp.zeros((batch,), bool), jnp.full((batch,), jnp.inf))
  return jax.lax.fori_loop(0, targets.shape[1], round_, init)
