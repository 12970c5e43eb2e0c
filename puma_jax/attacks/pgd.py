"""Projected gradient descent/ascent with one attack radius per example.

`pgd` perturbs each example within its own ball ||x_adv - x|| <= |eps_i| (L-infinity
or L2) and the box [0, 1]:

* eps_i > 0: ascends `loss_fn` (the usual adversarial example, Madry et al. 2018);
* eps_i < 0: descends it within radius |eps_i|, a helpful perturbation toward the
  label (PUMA gives negative radii to examples its margin model misclassifies);
* eps_i = 0: returns x_i exactly.

(`lp.split_eps` states this meaning once, for every attack and loss.)

The step size and the random start scale with |eps_i|: `step_size` is relative,
so `step_size=0.25` gives 2/255 steps for eps 8/255. An example's result depends
only on its own input, label, radius and random start, not on the rest of the
batch (given a per-example `loss_fn`, e.g. BatchNorm in eval mode).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from puma_jax.attacks import lp


def pgd(
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
  rng: jax.Array,
  x: jax.Array,
  y: jax.Array,
  eps: jax.Array,
  *,
  norm: str = 'linf',
  num_steps: int,
  step_size: float,
  random_start: bool = True,
) -> jax.Array:
  """PGD with per-example signed radii; returns the last iterate x_adv f32[B,...] in [0, 1].

  Each step moves x_adv by `step_size * |eps_i|` along sign(eps_i) times the sign of
  the gradient (L-infinity) or the L2-normalised gradient (L2), then projects onto
  the eps_i-ball around x and onto [0, 1]. Pure; jit/vmap/shard_map friendly.

  Args:
    loss_fn: `(x f32[B,...], y) -> f32[B]`, one loss per example, to be maximised.
    rng: a key for the random start (unused when `random_start=False`).
    x: f32[B,...] clean inputs in [0, 1].
    y: labels (anything `loss_fn` takes), passed through unchanged.
    eps: f32[B] radius per example; negative descends the loss, zero returns x.
    norm: 'linf' or 'l2'.
    num_steps: number of gradient steps (>= 0).
    step_size: step length relative to |eps_i|.
    random_start: start uniformly in the L-infinity ball, or (L2) along a uniformly
      random direction at a radius drawn uniformly in [0, |eps_i|]; otherwise at x.

  Returns:
    x_adv f32[B,...] with ||x_adv - x|| <= |eps_i| per example (up to float rounding).
  """
  x, radius, direction = check_inputs(x, eps, norm, num_steps)
  if random_start:
    x_adv = lp.project(x + lp.random_start(rng, x, radius, norm), x, radius, norm)
  else:
    x_adv = x

  grad_fn = jax.grad(lambda v: jnp.sum(loss_fn(v, y).astype(jnp.float32)))
  x_adv = projected_steps(grad_fn, x, x_adv, radius, direction, norm, num_steps, step_size)
  return jnp.where(lp.expand(radius, x) > 0, x_adv, x)


def check_inputs(
  x: jax.Array, eps: jax.Array, norm: str, num_steps: int, *, helpful: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Validates an attack's inputs; returns x f32[B,...] and `lp.split_eps(eps, helpful=...)`."""
  lp.check_norm(norm)
  if num_steps < 0:
    raise ValueError(f'num_steps must be >= 0, got {num_steps}')
  x = jnp.asarray(x, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  if eps.shape != x.shape[:1]:
    raise ValueError(
      f'eps must have shape ({x.shape[0]},), one radius per example; got {eps.shape}'
    )
  return (x, *lp.split_eps(eps, helpful=helpful))


def projected_steps(
  grad_fn: Callable[[jax.Array], jax.Array],
  x: jax.Array,
  x_adv: jax.Array,
  radius: jax.Array,
  direction: jax.Array,
  norm: str,
  num_steps: int,
  step_size: float,
) -> jax.Array:
  """`num_steps` projected steps from x_adv f32[B,...] (PGD's and TRADES' inner loop).

  Each step moves example i by `step_size * radius_i * direction_i` along the
  steepest ascent of `grad_fn` (sign for L-infinity, normalised for L2), then
  projects onto the radius_i-ball around x and onto [0, 1].
  """
  alpha = lp.expand(step_size * radius * direction, x)

  def body(_, v):
    return lp.project(v + alpha * lp.steepest_ascent(grad_fn(v), norm), x, radius, norm)

  return jax.lax.fori_loop(0, num_steps, body, x_adv)
