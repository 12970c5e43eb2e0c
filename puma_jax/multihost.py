"""What every process of a multi-host job does together: barriers and shared failure.

Single-process runs skip all of it. Used by the pipeline's stages and the margin stage.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_ok(ok: bool, what: str) -> None:
  """Raises on every process if `ok` is False on any process (no process waits forever)."""
  if jax.process_count() == 1:
    return
  flags = np.asarray(multihost_utils.process_allgather(np.asarray([ok], np.int32))).reshape(-1)
  failed = [i for i, f in enumerate(flags) if not f]
  if failed:
    raise RuntimeError(f'{what} failed on process(es) {failed}; see their logs')
