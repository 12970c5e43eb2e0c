"""The only module that knows the device mesh and shardings.

Training uses `jax.jit` with `NamedSharding` on a 1-D ('data',) mesh (global
semantics: results do not depend on the device count). Work where every device
should run its own loop, such as DeepFool stopping when its own examples have
converged, uses `jax.shard_map` over the same mesh (`per_device`). A sum over the
batch that XLA's partitioner cannot split by itself (a loop over chunks of the
batch, as in the CPU conv kernel gradient) uses `sum_over_batch_shards`, which
finds the mesh from the context that `with_mesh` sets while tracing.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
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


def num_devices(mesh: Mesh) -> int:
  """The number of devices along the data axis, over which batches are split."""
  return mesh.shape[DATA_AXIS]


# The old name (it counts devices, not dataset shards); kept until margins.py, the experiments
# and the tutorial use num_devices.


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of a global batch; checks that the batch divides evenly."""
  n_dev = num_devices(mesh)
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


def per_device(
  fn: Callable[..., Any], mesh: Mesh | jax.sharding.AbstractMesh, *, num_batched_args: int
) -> Callable[..., Any]:
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


def with_mesh(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """`fn` traced with `mesh` as the context mesh (for `sum_over_batch_shards` inside it).

  Wrap the function before `jax.jit`; the jitted function keeps `lower` and its
  cache. Nothing else changes: the mesh's axes stay automatic (GSPMD).
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def sum_over_batch_shards(
  fn: Callable[..., jax.Array], batched: Sequence[jax.Array], shared: Sequence[jax.Array]
) -> jax.Array:
  """`fn(*batched, *shared)` for a `fn` that sums over the leading (batch) axis of `batched`.

  Inside `with_mesh` with a data axis of n > 1 devices (and a batch divisible by
  n), every device applies `fn` to its own rows (`per_device`) and the results
  are summed over the devices. XLA's partitioner splits a plain contraction over a
  sharded batch the same way, but not a loop that slices the batch: it gathers
  the whole batch on every device, and every device repeats all the work.
  Elsewhere (no context mesh, one device, inside `shard_map`) this is `fn` itself.
  The result is the same up to the order of the float additions.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if (
    mesh.empty
    or DATA_AXIS not in mesh.axis_names
    or DATA_AXIS in mesh.manual_axes
    or mesh.shape[DATA_AXIS] == 1
    or any(a.shape[0] % mesh.shape[DATA_AXIS] for a in batched)
  ):
    return fn(*batched, *shared)
  per_shard = per_device(lambda *args: fn(*args)[None], mesh, num_batched_args=len(batched))
  return per_shard(*batched, *shared).sum(axis=0)  # [devices, ...]: XLA adds them (all-reduce)
