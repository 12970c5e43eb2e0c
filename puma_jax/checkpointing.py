"""The only module that knows Orbax: checkpoints of a training run under one folder.

A checkpoint is a composite of named items written by one
`orbax.checkpoint.CheckpointManager`:

- array items (the train state: any pytree of jax/NumPy arrays), saved with
  `StandardSave` and restored with `StandardRestore` onto the shardings of the
  given target;
- JSON items (the data iterator's state, small facts about the run), saved with
  `JsonSave`. They are written by the primary process only, so they must be the
  same on every process (checked when there are several).

Orbax writes every step into `<step>.orbax-checkpoint-tmp-*` and renames it (or,
on object stores, adds a commit file) when complete, so an interrupted save is
never taken as the latest; leftover temporaries are removed when the next
manager starts. Only the last `keep_last` steps are kept (a `LatestN`
preservation policy; `max_to_keep` is deprecated). Nothing here deletes the
checkpoint folder or anything above it.

Every process must make the same calls (`save`, `restore`) in the same order;
Orbax synchronises them and writes on the primary process where needed.

Example:
  with Checkpointer(workdir / 'checkpoints', keep_last=3) as ckpt:
    if (step := ckpt.latest_step()) is not None:
      restored = ckpt.restore({'state': state, 'data_iter': None})
      state, iter_state = restored['state'], restored['data_iter']
    ...
    ckpt.save(step, {'state': state, 'data_iter': iter_state})
"""

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

JSON_ITEMS = ('data_iter',)


def abstract_target(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """The restore target of `tree`: jax arrays become ShapeDtypeStructs with a sharding.

  Args:
    tree: a pytree of jax arrays, ShapeDtypeStructs or NumPy arrays (e.g. a
      freshly initialised train state, or `jax.eval_shape` of one).
    sharding: the sharding every jax leaf is restored onto; by default each
      array's own sharding (a ShapeDtypeStruct must then carry one).

  Returns:
    The same structure with `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`
    leaves in place of jax arrays; NumPy leaves stay (restored as NumPy).
  """

  def leaf(path, x):
    if isinstance(x, np.ndarray | np.generic):
      return x
    if not isinstance(x, jax.Array | jax.ShapeDtypeStruct):
      raise TypeError(f'restore target {jax.tree_util.keystr(path)} is a {type(x).__name__}')
    s = sharding if sharding is not None else getattr(x, 'sharding', None)
    if s is None:
      raise ValueError(
        f'restore target {jax.tree_util.keystr(path)} has no sharding; give arrays, or '
        'ShapeDtypeStructs with a NamedSharding (e.g. puma_jax.parallel.replicated(mesh)).'
      )
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  return jax.tree_util.tree_map_with_path(leaf, tree)


class Checkpointer:
  """Saves and restores the named items of a run in `directory` (keeps the last N steps).

  Args:
    directory: the checkpoint folder (created if missing; local path or gs://).
    keep_last: how many of the most recent steps to keep, >= 1.
    json_items: names of the items saved as JSON; every other item is a pytree
      of arrays.
    async_save: write in a background thread after copying arrays to host
      memory, so the caller may donate or overwrite them as soon as `save`
      returns.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    keep_last: int = 3,
    json_items: Sequence[str] = JSON_ITEMS,
    async_save: bool = True,
  ):
    if not isinstance(keep_last, int) or keep_last < 1:
      raise ValueError(f'keep_last must be an integer >= 1, got {keep_last!r}')
    directory = str(directory)
    if '://' not in directory:
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    self._json_items = frozenset(json_items)
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(n=keep_last),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, items: Mapping[str, Any]) -> bool:
    """Starts saving `items` as checkpoint `step`; returns False if that step exists.

    Args:
      step: the training step the items belong to.
      items: name -> pytree of arrays, or a JSON-serialisable value for names in
        `json_items`.

    Returns:
      True when a save was started. With `async_save` it completes in the
      background; `wait_until_finished` waits for it.
    """
    if not items:
      raise ValueError('nothing to save: items is empty')
    step = int(step)
    if step in self._manager.all_steps():
      logging.info(
        'checkpoint of step %d already exists in %s; not saved again', step, self.directory
      )
      return False
    args = {}
    for name, value in items.items():
      if name in self._json_items:
        try:
          text = json.dumps(value, sort_keys=True)
        except TypeError as e:
          raise TypeError(f'checkpoint item {name!r} is not JSON-serialisable: {e}') from e
        if jax.process_count() > 1:
          digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
          multihost_utils.assert_equal(
            digest,
            f'checkpoint item {name!r} differs between processes; JSON items are written by '
            'process 0 only, so they must be the same everywhere.',
          )
        args[name] = ocp.args.JsonSave(value)
      else:
        args[name] = ocp.args.StandardSave(value)
    return self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, targets: Mapping[str, Any], *, step: int | None = None) -> dict[str, Any]:
    """Restores the named items of checkpoint `step` (default: the latest).

    Args:
      targets: name -> restore target for array items (a pytree of arrays or
        ShapeDtypeStructs with shardings, see `abstract_target`; restored arrays
        land on those shardings), or None: JSON items, and array items restored
        as saved (an item saved from NumPy arrays comes back as NumPy arrays).
      step: which checkpoint; None means the latest.

    Returns:
      name -> restored value, for every name in `targets`.
    """
    self._manager.wait_until_finished()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
        f'no checkpoint of step {step} in {self.directory}; there are {self.all_steps()}'
      )
    saved = set(self.item_names(step))
    missing = sorted(set(targets) - saved)
    if missing:
      raise KeyError(
        f'checkpoint {step} in {self.directory} has no item(s) {missing}; it has {sorted(saved)}'
      )
    args = {}
    for name, target in targets.items():
      if name in self._json_items:
        args[name] = ocp.args.JsonRestore()
      else:
        args[name] = ocp.args.StandardRestore(None if target is None else abstract_target(target))
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] for name in targets}

  def item_names(self, step: int) -> list[str]:
    """Names of the items saved in checkpoint `step`."""
    # Each item is a subfolder of the step folder (Orbax's default step naming).
    return sorted(p.name for p in (self.directory / str(step)).iterdir() if p.is_dir())

  def wait_until_finished(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
