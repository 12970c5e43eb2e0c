"""The TRADES inner maximisation (Zhang et al. 2019) with one attack radius per example.

`trades_perturb` maximises KL(softmax(f(x)) || softmax(f(x_adv))) over the ball
||x_adv - x|| <= eps_i and the box [0, 1], starting from x + 0.001 * N(0, 1) (the
KL term has zero gradient at x itself; `start='normal'`, TRADES' reference and
DM-Improves-AT's L2 start) or from x + U(-eps_i, eps_i) clipped to [0, 1]
(`start='uniform'`, DM-Improves-AT's L-infinity start). The clean logits f(x) are
computed once.

A radius eps_i <= 0 returns x_i exactly: the KL term's minimiser is x itself, so
the helpful perturbation that PUMA asks for with a negative radius is x, and the
TRADES loss of that example reduces to its clean part.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from puma_jax.attacks import losses, lp
from puma_jax.attacks.pgd import check_inputs, projected_steps

# The reference implementation's start: x + 0.001 * N(0, 1), projected.
_START_SCALE = 0.001
STARTS = ('normal', 'uniform')


def trades_perturb(
  logits_fn: Callable[[jax.Array], jax.Array],
  rng: jax.Array,
  x: jax.Array,
  eps: jax.Array,
  *,
  norm: str = 'linf',
  num_steps: int,
  step_size: float,
  start: str = 'normal',
) -> jax.Array:
  """TRADES adversarial inputs x_adv f32[B,...] in [0, 1], ||x_adv - x|| <= max(eps_i, 0).

  Steps of `step_size * eps_i` along the sign of the KL gradient (L-infinity) or
  the L2-normalised gradient (L2), each followed by the projection onto the
  eps_i-ball and [0, 1]. Pure; jit/vmap/shard_map friendly; float32.

  Args:
    logits_fn: f32[B,...] -> logits [B,K]; per example (BatchNorm in eval mode).
    rng: key for the random start.
    x: f32[B,...] clean inputs in [0, 1].
    eps: f32[B] radius per example; eps_i <= 0 returns x_i.
    norm: 'linf' or 'l2'.
    num_steps: number of gradient steps (>= 0).
    step_size: step length relative to eps_i.
    start: 'normal' (x + 0.001 N(0, 1)) or 'uniform' (x + U(-eps_i, eps_i) per
      coordinate, L-infinity ball), each projected onto the ball and [0, 1].

  Returns:
    x_adv f32[B,...].
  """
  x, radius, direction = check_inputs(x, eps, norm, num_steps, helpful=False)
  clean_logits = jax.lax.stop_gradient(logits_fn(x).astype(jnp.float32))

  def kl_sum(v):
    return jnp.sum(losses.kl_divergence(clean_logits, logits_fn(v)))

  if start == 'uniform':
    noise = lp.expand(radius, x) * jax.random.uniform(rng, x.shape, jnp.float32, -1.0, 1.0)
  elif start == 'normal':
    noise = _START_SCALE * jax.random.normal(rng, x.shape, jnp.float32)
  else:
    raise ValueError(f'unknown TRADES start {start!r} (train.trades_start); known: {STARTS}')
  x_adv = lp.project(x + noise, x, radius, norm)
  x_adv = projected_steps(jax.grad(kl_sum), x, x_adv, radius, direction, norm, num_steps, step_size)
  return jnp.where(lp.expand(radius, x) > 0, x_adv, x)
