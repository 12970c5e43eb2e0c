"""The training step the tests run: `steps.train_step` with the tests' usual settings."""

import functools
from collections.abc import Callable
from typing import Any

from puma_jax import steps


def train_step_fn(
  model: Any,
  tx: Any,
  *,
  schedule: Callable[[Any], Any] = lambda s: 0.1,
  loss: str = 'trades',
  num_steps: int = 3,
  trades_beta: float = 5.0,
  label_smoothing: float = 0.0,
  ema_decay: float = 0.995,
  **options: Any,
) -> Callable[..., Any]:
  """`steps.train_step` with an L-inf attack of step size 0.25, unjitted and without a mesh.

  Args:
    model, tx, schedule, loss, num_steps, trades_beta, label_smoothing, ema_decay: as in
      `steps.train_step` (`num_steps` is the attack's step count).
    **options: further keyword arguments of `steps.train_step` (e.g. `bn_first_batch`).

  Returns:
    (state, batch, rng) -> (new state, metrics).
  """
  return functools.partial(
    steps.train_step,
    model=model,
    tx=tx,
    schedule=schedule,
    loss=loss,
    norm='linf',
    num_steps=num_steps,
    step_size=0.25,
    trades_beta=trades_beta,
    label_smoothing=label_smoothing,
    ema_decay=ema_decay,
    **options,
  )
