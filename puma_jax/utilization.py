"""Throughput and model FLOPs utilisation (MFU): device peaks, step FLOPs, the arithmetic.

MFU = model FLOPs of a step / (step time * devices * the device's dense bfloat16
peak), the PaLM definition: the FLOPs the model needs (forward 1x, backward 2x;
an input-only gradient 1x), not what the compiler happens to execute. It is
always relative to the bfloat16 peak, so a float32 run shows how much it leaves
on the table.

The model FLOPs of an adversarial train step are the forward FLOPs F of the model
at the step's batch (`forward_flops`: XLA's cost analysis of the lowered
forward, which has no loops and needs no compile) times the step's number of
forward-equivalent passes (`train_step_passes`). The compiled step's own cost
analysis cannot be used: XLA counts a `while` loop's body once whatever its trip
count, so the attack's 10 iterations would count as one.
"""

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Dense bfloat16 peak FLOP/s per device, by `jax.Device.device_kind`: (test, peak), first
# match wins. The kinds JAX reports: 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe',
# 'NVIDIA A100-SXM4-80GB', 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5p' / 'TPU v5', 'TPU v6 lite'.
_PEAKS: tuple[tuple[Callable[[str], bool], float, str], ...] = (
  (lambda k: 'H100' in k and 'PCIE' in k, 756e12, 'H100 PCIe'),
  (lambda k: 'H100' in k and 'NVL' not in k, 989e12, 'H100 SXM'),
  (lambda k: 'A100' in k, 312e12, 'A100'),
  (lambda k: k == 'TPU V4', 275e12, 'TPU v4'),
  (lambda k: k in ('TPU V5 LITE', 'TPU V5E'), 197e12, 'TPU v5e'),
  (lambda k: k in ('TPU V5', 'TPU V5P'), 459e12, 'TPU v5p'),
  (lambda k: k in ('TPU V6 LITE', 'TPU V6E'), 918e12, 'TPU v6e'),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bfloat16 peak FLOP/s of one device of `device_kind`; None when unknown."""
  kind = ' '.join(device_kind.upper().split())
  for test, peak, _ in _PEAKS:
    if test(kind):
      return peak
  return None


def train_step_passes(loss: str, attack_steps: int) -> int:
  """Forward-equivalent passes of one `steps.train_step` (model FLOPs = passes * F).

  TRADES: the attack's clean logits (1), `attack_steps` forward + input-gradient
  iterations (2 each), two training passes, each forward + backward (3 each).
  PGD-AT: the attack (2 per step), one training pass (3) and the clean logits of
  the metrics (1).
  """
  if loss == 'trades':
    return 1 + 2 * attack_steps + 6
  if loss == 'pgd_at':
    return 2 * attack_steps + 3 + 1
  raise ValueError(f'unknown loss {loss!r} (config field train.loss); known: trades, pgd_at')


def forward_flops(model: Any, variables: Any, image_shape: tuple[int, ...], batch: int) -> float:
  """FLOPs of `model.apply(variables, x, train=False)` for x f32[batch, *image_shape].

  From XLA's cost analysis of the lowered (not compiled) forward; `variables` may
  be abstract (`jax.ShapeDtypeStruct`s). Raises ValueError if the backend reports
  no FLOP count.
  """
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  if not cost or not cost.get('flops'):
    raise ValueError(f'no FLOP count in the cost analysis of the forward ({cost!r})')
  return float(cost['flops'])


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak: float | None):
  """Model FLOPs utilisation per device in [0, 1]; None when the peak is unknown."""
  if peak is None:
    return None
  if step_seconds <= 0 or num_devices <= 0:
    raise ValueError(f'step_seconds {step_seconds} and num_devices {num_devices} must be > 0')
  return flops_per_step / (step_seconds * num_devices * peak)


class StepMeter:
  """Examples/s and MFU per device over windows of train steps (for the train loop's log).

  `start()` after a step whose outputs are ready (so compilation is not counted),
  `step()` after each dispatched step, `read()` after a sync (e.g. the metrics'
  `device_get`): the window's rates; it starts the next window.
  """

  def __init__(
    self,
    examples_per_step: int,
    num_devices: int,
    flops_per_step: float | None,
    peak: float | None,
  ):
    self.examples_per_step, self.num_devices = examples_per_step, num_devices
    self.flops_per_step, self.peak = flops_per_step, peak
    self._t0: float | None = None
    self._steps = 0

  def start(self) -> None:
    self._t0, self._steps = time.perf_counter(), 0

  def step(self) -> None:
    self._steps += 1

  def read(self) -> dict[str, float] | None:
    """{'examples_per_s_per_device', 'step_s'[, 'mfu']} of the window; None if empty."""
    if self._t0 is None or not self._steps:
      self.start()
      return None
    step_s = (time.perf_counter() - self._t0) / self._steps
    self.start()
    out = {
      'step_s': step_s,
      'examples_per_s_per_device': self.examples_per_step / step_s / self.num_devices,
    }
    if self.flops_per_step is not None:
      util = mfu(self.flops_per_step, step_s, self.num_devices, self.peak)
      if util is not None:
        out['mfu'] = util
    return out
