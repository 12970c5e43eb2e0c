"""DM-Improves-AT's `cosinew` schedule: PyTorch's OneCycleLR stepped once per epoch.

DM-Improves-AT (Wang et al. 2023, `core/utils/train.py`) builds
`torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, pct_start=0.025,
total_steps=epochs)` and steps it once at the end of every epoch, so epoch e
(0-based) trains with the value the scheduler holds after e steps. With PyTorch's
defaults (cosine annealing, `div_factor=25`, `final_div_factor=1e4`,
`cycle_momentum=True`, `base_momentum=0.85`, `max_momentum=0.95`) that is two
phases over the epoch index e:

  warm-up, e <= p = pct_start * epochs - 1:
    lr = cos_anneal(max_lr / 25, max_lr, e / p), momentum = cos_anneal(0.95, 0.85, e / p)
  annealing, after it (ending at epochs - 1):
    lr = cos_anneal(max_lr, max_lr / 25 / 1e4, (e - p) / (epochs - 1 - p)),
    momentum = cos_anneal(0.85, 0.95, same fraction)

with cos_anneal(a, b, t) = b + (a - b) (1 + cos(pi t)) / 2. The cycled momentum
replaces SGD's (PyTorch overwrites the optimiser's momentum 0.9).
"""

from typing import NamedTuple

import jax.numpy as jnp
import optax

DIV_FACTOR = 25.0
FINAL_DIV_FACTOR = 1e4
BASE_MOMENTUM = 0.85
MAX_MOMENTUM = 0.95


class OneCycle(NamedTuple):
  """Per-step schedules (functions of the 0-based optimiser step)."""

  learning_rate: optax.Schedule
  momentum: optax.Schedule


def _cos_anneal(start, end, t):
  return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * t) + 1.0)


def one_cycle_per_epoch(
  *, max_lr: float, num_steps: int, steps_per_epoch: int, pct_start: float
) -> OneCycle:
  """`cosinew`: OneCycleLR over ceil(num_steps / steps_per_epoch) epochs, constant within one.

  Args:
    max_lr: the peak learning rate.
    num_steps: optimiser steps of the run.
    steps_per_epoch: optimiser steps per epoch (> 0).
    pct_start: share of the epochs spent warming up (DM-Improves-AT: 0.025).

  Returns:
    The learning-rate and momentum schedules.
  """
  if steps_per_epoch <= 0:
    raise ValueError(
      f'train.steps_per_epoch must be > 0 for train.lr_schedule=cosinew, got {steps_per_epoch}'
    )
  epochs = max(-(-num_steps // steps_per_epoch), 1)
  initial_lr = max_lr / DIV_FACTOR
  min_lr = initial_lr / FINAL_DIV_FACTOR
  warm_end = float(pct_start * epochs) - 1.0  # PyTorch's phase boundary, a float
  last = float(epochs - 1)

  def phase(step):
    e = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    warm = e <= warm_end
    t_warm = e / warm_end if warm_end > 0 else jnp.zeros_like(e)
    span = last - warm_end
    t_anneal = (e - warm_end) / span if span != 0 else jnp.zeros_like(e)
    return warm, t_warm, t_anneal

  def learning_rate(step):
    warm, t_warm, t_anneal = phase(step)
    return jnp.where(
      warm, _cos_anneal(initial_lr, max_lr, t_warm), _cos_anneal(max_lr, min_lr, t_anneal)
    )

  def momentum(step):
    warm, t_warm, t_anneal = phase(step)
    return jnp.where(
      warm,
      _cos_anneal(MAX_MOMENTUM, BASE_MOMENTUM, t_warm),
      _cos_anneal(BASE_MOMENTUM, MAX_MOMENTUM, t_anneal),
    )

  return OneCycle(learning_rate, momentum)
