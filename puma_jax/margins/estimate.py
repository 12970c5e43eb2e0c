"""The margin stage's cost: time a short probe here, project N examples on D devices.

`estimate_margin_cost` runs the same program as the stage on a few batches and
projects wall time, device-hours and cost (the main job's `--dry_run`).
"""

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from puma_jax import artifacts, parallel, tables
from puma_jax.datasets import input_pipeline
from puma_jax.datasets.splits import Split
from puma_jax.margins import engine, store
from puma_jax.margins.settings import MarginSettings, settings_from_config
from puma_jax.progress import format_seconds


@dataclasses.dataclass(frozen=True)
class CostEstimate:
  """A projection of the margin stage's cost from a timed probe.

  Attributes:
    settings: the estimator settings probed.
    batch_size: examples per probe batch.
    probe_batches: batches timed (after one warm-up batch).
    probe_devices: devices the probe ran on; device_kind: their kind.
    probe_seconds: time of the timed batches.
    compile_seconds: one-off compilation time (not in the projection).
    mean_iterations: mean DeepFool steps per probed example (cost grows with it).
    probe_data: 'dataset' (first batches of the first split) or 'random'.
    num_examples: N to project for; num_devices: D to project for.
    price_per_device_hour: price of one device for one hour (0: no price given).
  """

  settings: MarginSettings
  batch_size: int
  probe_batches: int
  probe_devices: int
  device_kind: str
  probe_seconds: float
  compile_seconds: float
  mean_iterations: float
  probe_data: str
  num_examples: int
  num_devices: int
  price_per_device_hour: float = 0.0

  @property
  def examples_per_second_per_device(self) -> float:
    return self.batch_size * self.probe_batches / self.probe_seconds / self.probe_devices

  def device_hours(self, num_examples: int | None = None) -> float:
    n = self.num_examples if num_examples is None else num_examples
    return n / self.examples_per_second_per_device / 3600.0

  def hours(self, num_examples: int | None = None, num_devices: int | None = None) -> float:
    d = self.num_devices if num_devices is None else num_devices
    return self.device_hours(num_examples) / d

  def cost(self, num_examples: int | None = None) -> float:
    return self.device_hours(num_examples) * self.price_per_device_hour

  def table(self) -> str:
    """A plain-text report: the probe, then a table of projected time and cost."""
    s = self.settings
    lines = [
      f'Margin stage estimate: {s.estimator} {s.norm}, {s.num_candidates} candidates, '
      + ''.join(f'{k} {v}, ' for k, v in s.options_dict().items())
      + f'clip {s.clip}',
      f'probe: {self.probe_batches} batches of {self.batch_size} ({self.probe_data} inputs) on '
      f'{self.probe_devices} x {self.device_kind}: '
      f'{self.examples_per_second_per_device:,.1f} examples/s per device, '
      f'{self.mean_iterations:.2f} {s.estimator} steps per example; '
      f'compile {self.compile_seconds:.1f} s once per batch shape (not included)',
      '',
    ]
    header = ['examples', 'devices', 'wall time', 'device-hours']
    if self.price_per_device_hour:
      header.append(f'cost at {self.price_per_device_hour:g}/device-hour')
    rows = []
    devices = sorted({self.probe_devices, self.num_devices})
    for d in devices:
      row = [
        f'{self.num_examples:,}',
        str(d),
        format_seconds(self.hours(num_devices=d) * 3600.0),
        f'{self.device_hours():,.2f}',
      ]
      if self.price_per_device_hour:
        row.append(f'{self.cost():,.2f}')
      rows.append(row)
    lines.append(tables.markdown_table(header, rows))
    lines += [
      '',
      'Assumes devices of the probed kind, linear scaling over devices and hosts (each host '
      'scores its own shards), input reading hidden behind compute, and the probed number of '
      'DeepFool steps per example (a more robust margin model takes more steps).',
    ]
    return '\n'.join(lines)


def _probe_batches(
  splits: Mapping[str, Split] | None,
  image_shape: tuple[int, ...] | None,
  batch_size: int,
  count: int,
  model: nn.Module,
  variables: Any,
  seed: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
  if splits:
    split = next(iter(splits.values()))
    out = []
    for k in range(split.num_shards):
      for batch in input_pipeline.shard_batches(split, k, batch_size=batch_size):
        out.append((batch['image'], batch['label']))
        if len(out) == count:
          return out, 'dataset'
    base = list(out)
    while len(out) < count:  # a split smaller than the probe: reuse its batches
      out.append(base[len(out) % len(base)])
    return out, 'dataset'
  if image_shape is None:
    raise ValueError('estimate_margin_cost: give splits or image_shape')
  rng = np.random.default_rng(seed)
  apply = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), axis=1))
  out = []
  for _ in range(count):
    x = rng.random((batch_size, *image_shape), np.float32)
    out.append((x, np.asarray(apply(variables, x), np.int32)))
  return out, 'random'


def estimate_margin_cost(
  model: nn.Module,
  variables: Any,
  *,
  settings: MarginSettings,
  batch_size: int,
  deepfool_batch_size: int = 0,
  splits: Mapping[str, Split] | Sequence[Split] | Split | None = None,
  image_shape: tuple[int, int, int] | None = None,
  num_examples: int | None = None,
  num_devices: int | None = None,
  price_per_device_hour: float = 0.0,
  probe_batches: int = 3,
  mesh: jax.sharding.Mesh | None = None,
  seed: int = 0,
) -> CostEstimate:
  """Times DeepFool on a few batches here and projects the cost of N examples on D devices.

  The probe runs the same compiled program as `compute_margins` (per-device
  DeepFool on this process's devices) on the first batches of the first split
  (or, without splits, on uniform random images of `image_shape` labelled with
  the model's own predictions, which usually converge faster than real data).
  One warm-up batch is run first; compilation is timed separately.

  Args:
    model, variables, settings, batch_size, deepfool_batch_size, mesh: as for `compute_margins`.
    splits: probe data; also the default N (their total number of examples).
    image_shape: (H, W, C) for random probe images when no splits are given.
    num_examples: N (default: the splits' total).
    num_devices: D (default: all devices of the job, `jax.device_count()`).
    price_per_device_hour: price of one device-hour (0: no cost column).
    probe_batches: batches timed.
    seed: seed of the random probe images.

  Returns:
    A `CostEstimate`; print `estimate.table()`.
  """
  named = store.named_splits(splits) if splits is not None else None
  if num_examples is None:
    if named is None:
      raise ValueError('estimate_margin_cost: give num_examples (or splits to count)')
    num_examples = sum(s.num_examples for s in named.values())
  num_devices = jax.device_count() if num_devices is None else num_devices
  if int(num_examples) != num_examples or num_examples < 1:
    raise ValueError(f'estimate: number of examples {num_examples} must be a positive integer')
  if int(num_devices) != num_devices or num_devices < 1:
    raise ValueError(f'estimate: number of devices {num_devices} must be a positive integer')
  if not (math.isfinite(price_per_device_hour) and price_per_device_hour >= 0):
    raise ValueError(f'estimate: price per device-hour {price_per_device_hour} must be >= 0')
  if probe_batches < 1:
    raise ValueError(f'estimate: probe_batches={probe_batches} must be >= 1')
  mesh = engine.local_mesh(mesh)
  engine.check_batch_size(batch_size, parallel.num_devices(mesh))
  engine.check_deepfool_batch_size(deepfool_batch_size)
  if named is not None:
    engine.check_model(model, variables, named)
  batches, kind = _probe_batches(
    named, image_shape, batch_size, probe_batches + 1, model, variables, seed
  )
  runner = engine.MarginEngine(model, variables, settings, mesh, batch_size, deepfool_batch_size)
  jax.block_until_ready(runner.dispatch(*batches[0]))  # compile (if not cached) and warm up
  device_batches = [
    (jax.device_put(x, runner.sharding), jax.device_put(y, runner.sharding)) for x, y in batches[1:]
  ]
  start = time.perf_counter()
  outs = [runner(x, y) for x, y in device_batches]
  jax.block_until_ready(outs)
  seconds = time.perf_counter() - start
  iterations = np.concatenate([np.asarray(o[1]) for o in outs])
  return CostEstimate(
    settings=settings,
    batch_size=batch_size,
    probe_batches=probe_batches,
    probe_devices=parallel.num_devices(mesh),
    device_kind=mesh.devices.flat[0].device_kind,
    probe_seconds=seconds,
    compile_seconds=runner.compile_seconds,
    mean_iterations=float(iterations.mean()),
    probe_data=kind,
    num_examples=int(num_examples),
    num_devices=int(num_devices),
    price_per_device_hour=float(price_per_device_hour),
  )


def estimate_from_config(
  margins_config: Any,
  model: nn.Module,
  variables: Any,
  splits: Mapping[str, Split] | Sequence[Split] | Split | None = None,
  *,
  image_shape: tuple[int, int, int] | None = None,
) -> CostEstimate:
  """`estimate_margin_cost` with `config.margins` (settings, batch size, `estimate.*`)."""
  est = margins_config.estimate
  return estimate_margin_cost(
    model,
    variables,
    settings=settings_from_config(margins_config),
    batch_size=margins_config.batch_size,
    deepfool_batch_size=margins_config.deepfool_batch_size,
    splits=splits,
    image_shape=image_shape,
    num_examples=est.num_examples or None,
    num_devices=est.num_devices or None,
    price_per_device_hour=est.price_per_device_hour,
    probe_batches=est.probe_batches,
  )


def write_estimate(estimate: CostEstimate, path: str | os.PathLike) -> Path:
  """Writes the estimate as JSON (atomic), for records of planned runs."""
  data = dataclasses.asdict(estimate)
  data['settings'] = {'estimator': estimate.settings.estimator, **estimate.settings.as_dict()}
  data.update(
    examples_per_second_per_device=estimate.examples_per_second_per_device,
    hours=estimate.hours(),
    device_hours=estimate.device_hours(),
    cost=estimate.cost(),
  )
  return artifacts.write_json(path, data)
