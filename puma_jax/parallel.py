"""The only module that knows the device mesh and shardings.

Training uses `jax.jit` with `NamedSharding` on a 1-D ('data',) mesh (global
semantics: results do not depend on the device count). Work where every device
should run its own loop, such as DeepFool stopping when its own examples have
converged, uses `jax.shard_map` over the same mesh (`per_device`).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D ('data',) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, other axes replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def num_shards(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of a global batch; checks that the batch divides evenly."""
  n_dev = num_shards(mesh)
  if global_batch_size % n_dev:
    raise ValueError(
      f'batch size {global_batch_size} is not divisible by the {n_dev} devices of the '
      f'mesh; choose a multiple of {n_dev}.'
    )
  return global_batch_size // jax.process_count()


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's part of a batch (numpy, leading axis) into global arrays."""
  sharding = data_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (e.g. parameters) fully replicated on the mesh."""
  return jax.device_put(tree, replicated(mesh))


def per_device(fn: Callable[..., Any], mesh: Mesh, *, num_batched_args: int) -> Callable[..., Any]:
  """Runs `fn` on each device's slice of the first `num_batched_args` arguments.

  Those arguments (pytrees) are split on their leading axis over the data axis;
  any further arguments are replicated. Outputs are concatenated on the leading
  axis. Each device executes its own copy of `fn`, so a `lax.while_loop` inside
  stops when that device's own examples are done.
  """

  def wrapped(*args):
    batched, rest = args[:num_batched_args], args[num_batched_args:]
    in_specs = tuple(PartitionSpec(DATA_AXIS) for _ in batched) + tuple(
      PartitionSpec() for _ in rest
    )
    return jax.shard_map(
      fn, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec(DATA_AXIS), check_vma=False
    )(*args)

  return wrapped


def pad_batch(
  batch: Mapping[str, np.ndarray], size: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pads every array of a batch on its leading axis to `size` (repeating the first row).

  Returns the padded batch and a bool mask that is True for real rows, so that
  sums over a padded last batch stay exact.
  """
  n = len(next(iter(batch.values())))
  if n > size:
    raise ValueError(f'batch of {n} rows does not fit in {size}')
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if n < size:
      fill = np.repeat(v[:1] if n else np.zeros((1,) + v.shape[1:], v.dtype), size - n, axis=0)
      v = np.concatenate([v, fill], axis=0)
    out[k] = v
  mask = np.zeros(size, bool)
  mask[:n] = True
  return out, mask
