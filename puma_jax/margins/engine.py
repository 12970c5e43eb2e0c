"""The margin engine on the devices: a per-device margin estimator over a 1-D mesh.

Each batch is split over a ('data',) mesh of this process's devices with
`parallel.per_device` (`jax.shard_map`), and every device runs the estimator the
settings name (`attacks.margin_estimators.ESTIMATORS`: DeepFool's `while_loop`,
first_order's single linearisation, FAB's restarts) on its own examples, so a
device running DeepFool stops when its own examples have converged.
"""

import functools
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from puma_jax import artifacts, parallel
from puma_jax.attacks.margin_estimators import ESTIMATORS
from puma_jax.datasets.splits import Split
from puma_jax.margins.settings import MarginSettings


def local_mesh(mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh:
  if mesh is None:
    return parallel.make_mesh(jax.local_devices())
  if mesh.axis_names != (parallel.DATA_AXIS,):
    raise ValueError(f'the margin mesh must be 1-D over {parallel.DATA_AXIS!r}, got {mesh}')
  pi = jax.process_index()
  remote = [d for d in mesh.devices.flat if d.process_index != pi]
  if remote:
    raise ValueError(
      f'the margin mesh holds devices of other processes ({remote[:2]}...): every process '
      'scores its own shards, so give a mesh of jax.local_devices() (or mesh=None)'
    )
  return mesh


def check_batch_size(batch_size: int, num_devices: int) -> None:
  if int(batch_size) != batch_size or batch_size < 1 or batch_size % num_devices:
    raise ValueError(
      f'margins.batch_size={batch_size}: need a positive multiple of the {num_devices} local '
      f'devices (e.g. {num_devices * max(1, int(batch_size) // num_devices)})'
    )


def check_deepfool_batch_size(deepfool_batch_size: int) -> int:
  if int(deepfool_batch_size) != deepfool_batch_size or deepfool_batch_size < 0:
    raise ValueError(
      f'margins.deepfool_batch_size={deepfool_batch_size}: need an integer >= 0 (the '
      'examples DeepFool iterates at once per device; 0 runs the whole per-device batch)'
    )
  return int(deepfool_batch_size)


def check_model(model: nn.Module, variables: Any, splits: Mapping[str, Split]) -> None:
  for key, s in splits.items():
    x = jax.ShapeDtypeStruct((1, *s.image_shape), jnp.float32)
    try:
      out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    except Exception as e:  # noqa: BLE001 (Flax raises many types for wrong shapes)
      raise ValueError(
        f'the margin model cannot take the images of {key} split {s!r} '
        f'(shape {s.image_shape}): {type(e).__name__}: {e}'
      ) from e
    if out.shape != (1, s.num_classes):
      raise ValueError(
        f'the margin model returns logits of shape {out.shape[1:]} but {key} split {s!r} has '
        f'{s.num_classes} classes; use a margin model with {s.num_classes} outputs'
      )


@functools.lru_cache(maxsize=16)
def margin_program(
  model: nn.Module,
  settings: MarginSettings,
  mesh: jax.sharding.Mesh,
  deepfool_batch_size: int = 0,
):
  """jit(shard_map(estimator)): (x f32[B,...], y i32[B], variables) -> (margin, iterations, converged).

  The estimator is `ESTIMATORS[settings.estimator]` with the settings' options.

  One jitted function per (model, settings, mesh, deepfool_batch_size), so jit's
  cache holds its compilations across engines and calls.

  `deepfool_batch_size` > 0 bounds the rows the model sees at once on each device
  (the estimators' `batch_size`): DeepFool's slots, where a finished example frees
  its slot for the next, so the loop does not wait for the batch's slowest example;
  first_order and fab process the device's examples in chunks of that size.
  """
  estimate = ESTIMATORS[settings.estimator]
  options = settings.options_dict()

  def per_device(x, y, variables):
    per = x.shape[0]
    res = estimate(
      lambda v: model.apply(variables, v, train=False),
      x,
      y,
      norm=settings.norm,
      num_candidates=settings.num_candidates,
      clip=settings.clip,
      batch_size=min(deepfool_batch_size, per) if deepfool_batch_size else None,
      **options,
    )
    return res.margin, res.iterations, res.converged

  return jax.jit(parallel.per_device(per_device, mesh, num_batched_args=2))


class MarginEngine:
  """Margins of batches on a mesh of local devices: what the stage runs per batch.

  `dispatch(image, label)` places a batch (f32[B,H,W,C], i32[B]) on the mesh and
  starts the per-device estimator program, returning its device outputs
  (margin f32[B], iterations i32[B], converged bool[B]) without waiting for them.
  The program is a plain `jax.jit`, shared by engines with the same model,
  settings, mesh and `deepfool_batch_size`, so jit's cache compiles it once per
  batch shape; `compile_seconds` and `compilations` count the compilations this
  engine caused.
  """

  def __init__(
    self,
    model: nn.Module,
    variables: Any,
    settings: MarginSettings,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    deepfool_batch_size: int = 0,
  ):
    self.model, self.settings, self.mesh, self.batch_size = model, settings, mesh, batch_size
    self.deepfool_batch_size = check_deepfool_batch_size(deepfool_batch_size)
    self.sharding = parallel.data_sharding(mesh)
    self.variables = parallel.replicate(jax.tree.map(artifacts.to_host, variables), mesh)
    self.program = margin_program(model, settings, mesh, self.deepfool_batch_size)
    self.compile_seconds = 0.0
    self.compilations = 0

  def __call__(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
    """Runs the program on a batch already on the mesh (x f32[B,...], y i32[B]), asynchronously."""
    cached = self.program._cache_size()  # noqa: SLF001 (jit's own count of compiled programs)
    start = time.perf_counter()
    out = self.program(x, y, self.variables)  # returns once compiled and dispatched
    if self.program._cache_size() > cached:  # noqa: SLF001
      self.compilations += 1
      self.compile_seconds += time.perf_counter() - start
    return out

  def dispatch(self, image: np.ndarray, label: np.ndarray) -> tuple[jax.Array, ...]:
    """Starts the estimator on a host batch; returns the (not yet computed) device outputs."""
    x = jax.device_put(np.asarray(image, np.float32), self.sharding)
    y = jax.device_put(np.asarray(label, np.int32), self.sharding)
    out = self(x, y)
    for a in out:
      a.copy_to_host_async()
    return out
