"""Auto-PGD (APGD; Croce and Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks"), L-infinity and L2.

PGD with momentum 0.75 whose step size starts at 2 eps and is halved, per example,
at checkpoints w_0 = 0 < w_1 < ... (first gap 22% of the budget, each later gap 3%
shorter, never below 6%) when either
  1. the loss rose in at most rho = 75% of the steps since the last checkpoint, or
  2. the step was not halved at the last checkpoint and the best loss did not improve
     since then;
the iterate then restarts from the best point found so far. The attack keeps, per
example, the highest-loss point and the first misclassified point. Defaults are
AutoAttack's (100 steps, rho 0.75, a random start on the sphere of radius eps).

Condition 1 counts the increases f(x_k+1) > f(x_k) over the window, starting from
the loss at the random start (the reference code compares its first step with an
unset entry, 0, instead; the two differ in at most one count at the first checkpoint).

Every example is attacked on its own: its randomness comes from its own key and an
example that is inactive, or (with `stop_on_success`) already misclassified, is
frozen. The loop (`lax.while_loop`) ends when no example is left to attack, so
inside `jax.shard_map` each device stops on its own.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from puma_jax.attacks import losses, lp

LOSSES = ('ce', 'dlr', 'dlr_targeted')


class APGDResult(NamedTuple):
  """Per-example outcome of `apgd`.

  Attributes:
    x_adv: f32[B,...] a misclassified point where `success`, else the highest-loss
      point (the clean input for inactive examples).
    success: bool[B] a misclassified point within the radius was found.
    x_best: f32[B,...] the point of highest loss seen.
    loss_best: f32[B] the loss there (-inf for inactive examples).
  """

  x_adv: jax.Array
  success: jax.Array
  x_best: jax.Array
  loss_best: jax.Array


def checkpoints(num_steps: int) -> list[int]:
  """Iterations (1-based counts of steps) after which the step size may be halved."""
  window = max(int(0.22 * num_steps), 1)
  decrease = max(int(0.03 * num_steps), 1)
  minimum = max(int(0.06 * num_steps), 1)
  out, at = [], window
  while at <= num_steps:
    out.append(at)
    window = max(window - decrease, minimum)
    at += window
  return out


def halve_step(
  increases: jax.Array,
  window: jax.Array,
  loss_best: jax.Array,
  loss_best_at_check: jax.Array,
  reduced_at_check: jax.Array,
  *,
  rho: float,
) -> jax.Array:
  """APGD's two conditions for halving the step at a checkpoint, bool[B].

  Args:
    increases: i32[B] steps since the last checkpoint whose loss beat the previous one.
    window: i32[] steps since the last checkpoint.
    loss_best: f32[B] best loss now.
    loss_best_at_check: f32[B] best loss at the last checkpoint.
    reduced_at_check: bool[B] the step was halved at the last checkpoint.
    rho: 0.75 in AutoAttack.
  """
  oscillating = increases <= rho * window
  stalled = ~reduced_at_check & (loss_best_at_check >= loss_best)
  return oscillating | stalled


def _loss_fn(name: str, target: jax.Array | None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  if name == 'ce':
    return losses.cross_entropy
  if name == 'dlr':
    return losses.dlr_loss
  if name == 'dlr_targeted':
    if target is None:
      raise ValueError("loss='dlr_targeted' needs `target` i32[B].")
    return lambda logits, y: losses.dlr_targeted_loss(logits, y, target)
  raise ValueError(f'unknown APGD loss {name!r}; use one of {LOSSES}.')


def _check_classes(name: str, num_classes: int) -> None:
  needed = {'ce': 2, 'dlr': 3, 'dlr_targeted': 4}[name]
  if num_classes < needed:
    raise ValueError(
      f'the {name} loss needs at least {needed} classes, the model has {num_classes}; '
      'use the ce loss (apgd-ce) for this model.'
    )


def apgd(
  logits_fn: Callable[[jax.Array], jax.Array],
  rng: jax.Array,
  x: jax.Array,
  y: jax.Array,
  eps: float | jax.Array,
  *,
  norm: str,
  loss: str = 'ce',
  target: jax.Array | None = None,
  num_steps: int = 100,
  rho: float = 0.75,
  active: jax.Array | None = None,
  stop_on_success: bool = True,
) -> APGDResult:
  """Maximises `loss` within the eps-ball around x and [0, 1] with APGD.

  Args:
    logits_fn: f32[B,...] -> f32[B,K], per-example independent (no batch statistics).
    rng: a typed key, or key[B] with one key per example (the random start).
    x: f32[B,...] in [0, 1].
    y: i32[B] labels.
    eps: the radius, a scalar or f32[B].
    norm: 'linf' or 'l2'.
    loss: 'ce' (APGD-CE), 'dlr' (APGD-DLR) or 'dlr_targeted' (one round of APGD-T).
    target: i32[B] target classes for 'dlr_targeted'.
    num_steps: steps; with the start, num_steps + 1 forward and backward passes.
    rho: the fraction of loss increases below which the step is halved.
    active: bool[B]; inactive examples are not attacked (default: all).
    stop_on_success: freeze an example once it is misclassified (AutoAttack). False
      keeps maximising the loss for the whole budget.

  Returns:
    An `APGDResult`.
  """
  lp.check_norm(norm)
  batch = x.shape[0]
  loss_of = _loss_fn(loss, target)
  x = x.astype(jnp.float32)
  eps = lp.batch_eps(eps, batch)
  active = jnp.ones((batch,), bool) if active is None else active.astype(bool)
  keys = lp.example_keys(rng, batch)

  def value_and_grad(z):
    def total(z):
      logits = logits_fn(z).astype(jnp.float32)
      _check_classes(loss, logits.shape[-1])
      values = loss_of(logits, y)
      return jnp.sum(values), (values, logits)

    (_, (values, logits)), grad = jax.value_and_grad(total, has_aux=True)(z)
    return values, jnp.argmax(logits, axis=-1) != y, grad

  sel = functools.partial(_select, like=x)
  x_start = sel(active, lp.random_on_sphere(keys, x, eps, norm), x)
  checks = jnp.asarray(checkpoints(num_steps) + [num_steps + 1], jnp.int32)
  minus_inf = jnp.full((batch,), -jnp.inf)

  # One model evaluation per loop iteration (the start, then each step) keeps a single
  # copy of the model's forward and backward pass in the compiled loop.
  state = dict(
    n=jnp.zeros((), jnp.int32),  # steps taken; `z` is the point they led to
    z=x_start,
    next_check=jnp.zeros((), jnp.int32),  # index into `checks`
    since_check=jnp.zeros((), jnp.int32),  # steps since the last checkpoint
    x_adv=x_start,
    x_prev=x_start,
    grad=jnp.zeros_like(x),
    step=2.0 * eps,
    x_best=x_start,
    grad_best=jnp.zeros_like(x),
    loss_best=minus_inf,
    loss_prev=minus_inf,
    x_found=x_start,
    success=jnp.zeros((batch,), bool),
    increases=jnp.zeros((batch,), jnp.int32),
    loss_best_at_check=minus_inf,
    reduced_at_check=jnp.ones((batch,), bool),
  )

  def live(s):
    return active & ~(s['success'] & stop_on_success)

  def cond(s):
    return (s['n'] <= num_steps) & jnp.any(live(s))

  def body(s):
    upd = live(s)
    first = s['n'] == 0
    z = s['z']
    values, wrong, grad = value_and_grad(z)

    newly = upd & wrong & ~s['success']
    improved = upd & (first | (values > s['loss_best']))
    t = dict(s)
    t['x_prev'] = sel(upd, s['x_adv'], s['x_prev'])
    t['x_adv'] = sel(upd, z, s['x_adv'])
    t['grad'] = sel(upd, grad, s['grad'])
    t['x_found'] = sel(newly, z, s['x_found'])
    t['success'] = s['success'] | newly
    t['increases'] = s['increases'] + (upd & ~first & (values > s['loss_prev']))
    t['loss_prev'] = jnp.where(upd, values, s['loss_prev'])
    t['x_best'] = sel(improved, z, s['x_best'])
    t['grad_best'] = sel(improved, grad, s['grad_best'])
    t['loss_best'] = jnp.where(improved, values, s['loss_best'])
    t['loss_best_at_check'] = jnp.where(first, t['loss_best'], s['loss_best_at_check'])
    t['since_check'] = s['since_check'] + jnp.where(first, 0, 1)

    # The step-size checkpoint, applied only at the scheduled iterations.
    at_check = s['n'] == checks[s['next_check']]
    reduce = (
      at_check
      & upd
      & halve_step(
        t['increases'],
        t['since_check'],
        t['loss_best'],
        s['loss_best_at_check'],
        s['reduced_at_check'],
        rho=rho,
      )
    )
    t['step'] = jnp.where(reduce, 0.5 * s['step'], s['step'])
    t['x_adv'] = sel(reduce, t['x_best'], t['x_adv'])
    t['grad'] = sel(reduce, t['grad_best'], t['grad'])
    t['reduced_at_check'] = jnp.where(at_check, reduce, s['reduced_at_check'])
    t['loss_best_at_check'] = jnp.where(at_check, t['loss_best'], t['loss_best_at_check'])
    t['increases'] = jnp.where(at_check, 0, t['increases'])
    t['since_check'] = jnp.where(at_check, 0, t['since_check'])
    t['next_check'] = s['next_check'] + at_check.astype(jnp.int32)

    # The next step: a gradient step, then momentum 0.75 (none on the first step).
    x_cur, grad = t['x_adv'], t['grad']
    a = jnp.where(first, 1.0, 0.75)
    direction = lp.steepest_ascent(grad, norm)
    z1 = lp.project(x_cur + lp.expand(t['step'], x) * direction, x, eps, norm)
    z1 = lp.project(x_cur + a * (z1 - x_cur) + (1.0 - a) * (x_cur - t['x_prev']), x, eps, norm)
    t['z'] = sel(upd, z1, z)
    t['n'] = s['n'] + 1
    return t

  s = jax.lax.while_loop(cond, body, state)
  return APGDResult(
    x_adv=sel(s['success'], s['x_found'], s['x_best']),
    success=s['success'],
    x_best=s['x_best'],
    loss_best=s['loss_best'],
  )


def apgd_targeted(
  logits_fn: Callable[[jax.Array], jax.Array],
  rng: jax.Array,
  x: jax.Array,
  y: jax.Array,
  eps: float | jax.Array,
  *,
  norm: str,
  num_targets: int = 9,
  num_steps: int = 100,
  rho: float = 0.75,
  active: jax.Array | None = None,
) -> APGDResult:
  """APGD-T: APGD on the targeted DLR loss, one round per target class.

  Round r (r = 0, 1, ...) targets the (r+2)-th largest clean logit and attacks only
  the examples no earlier round has broken; each round draws a fresh random start
  from key fold_in(key_i, r). `num_targets` is capped at K - 1.

  Args:
    logits_fn, rng, x, y, eps, norm, num_steps, rho, active: as in `apgd`.
    num_targets: target classes tried per example (AutoAttack: 9).

  Returns:
    An `APGDResult`; `x_best` and `loss_best` come from the last round that ran on
    each example.
  """
  batch = x.shape[0]
  keys = lp.example_keys(rng, batch)
  active = jnp.ones((batch,), bool) if active is None else active.astype(bool)
  targets = target_classes(logits_fn(x), num_targets)
  sel = functools.partial(_select, like=x)

  def round_(r, res):
    out = apgd(
      logits_fn,
      lp.fold_in_each(keys, r),
      x,
      y,
      eps,
      norm=norm,
      loss='dlr_targeted',
      target=targets[:, r],
      num_steps=num_steps,
      rho=rho,
      active=active & ~res.success,
    )
    ran = active & ~res.success
    return APGDResult(
      x_adv=sel(ran, out.x_adv, res.x_adv),
      success=res.success | out.success,
      x_best=sel(ran, out.x_best, res.x_best),
      loss_best=jnp.where(ran, out.loss_best, res.loss_best),
    )

  init = APGDResult(x, jnp.zeros((batch,), bool), x, jnp.full((batch,), -jnp.inf))
  return jax.lax.fori_loop(0, targets.shape[1], round_, init)


def target_classes(logits: jax.Array, num_targets: int) -> jax.Array:
  """The classes with the 2nd, 3rd, ... largest logits, i32[B, min(num_targets, K-1)]."""
  num_targets = min(num_targets, logits.shape[-1] - 1)
  # top_k rather than a full sort: cheap with tens of thousands of classes.
  _, order = jax.lax.top_k(logits.astype(jnp.float32), num_targets + 1)
  return order[:, 1:].astype(jnp.int32)


def _select(cond: jax.Array, a: jax.Array, b: jax.Array, *, like: jax.Array) -> jax.Array:
  """Per-example where: bool[B] picks rows of a (else b), f32[B,...]."""
  return jnp.where(lp.expand(cond, like), a, b)
