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

Integrity: `save` records a content checksum of every leaf of every item
(`artifacts.tree_checksums`, sha256) in a JSON item named 'checksums', written
in the same atomic step. `restore` verifies the restored items against it. A
damaged checkpoint (a checksum that differs, or data Orbax cannot read while an
older step can be read) is skipped for the previous one, with a warning that
names the damaged item folder and leaves; a later `save` of that step replaces
it. Leaves sharded across processes are not verified (each process holds only
a part). Checkpoints without checksums are restored unverified.

An array item can also be restored as saved, without an object of its type
(`AsSaved(sharding)`: the structure, shapes and dtypes are read from the
checkpoint): `model_io` reads the EMA weights of a train state that way, whatever
optimiser state sits beside them. Its checksums are verified all the same (leaf
names are compared with attributes and dict keys alike: `.params` = `['params']`).

Every process must make the same calls (`save`, `restore`) in the same order;
Orbax synchronises them and writes on the primary process where needed.

Example:
  with Checkpointer(workdir / 'checkpoints', keep_last=3) as ckpt:
    if (step := ckpt.latest_step()) is not None:
      step, restored = ckpt.restore_latest({'state': state, 'data_iter': None})
      state, iter_state = restored['state'], restored['data_iter']
    ...
    ckpt.save(step, {'state': state, 'data_iter': iter_state})
"""

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from puma_jax import artifacts

JSON_ITEMS = ('data_iter', 'prune')  # the train loop's JSON items
CHECKSUMS = 'checksums'  # the JSON item holding every other item's content checksums


class DamagedCheckpointError(RuntimeError):
  """A checkpoint whose restored content does not match the checksums recorded when saved."""


@dataclasses.dataclass(frozen=True)
class AsSaved:
  """A restore target: the array item as saved, every array placed on `sharding`.

  The item's tree structure, shapes and dtypes are read from the checkpoint;
  dataclasses and named tuples come back as dicts, tuples as lists.
  """

  sharding: jax.sharding.Sharding


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
    if CHECKSUMS in json_items:
      raise ValueError(f'the item name {CHECKSUMS!r} is reserved for the checksums')
    self._json_items = frozenset(json_items)
    self._damaged: set[int] = set()
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
    if CHECKSUMS in items:
      raise ValueError(f'the item name {CHECKSUMS!r} is reserved for the checksums')
    step = int(step)
    if step in self._manager.all_steps():
      if step not in self._damaged:
        logging.info(
          'checkpoint of step %d already exists in %s; not saved again', step, self.directory
        )
        return False
      logging.warning('replacing the damaged checkpoint %s', self.directory / str(step))
      self._manager.delete(step)
      self._damaged.discard(step)
    args = {}
    checksums = {}
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
        checksums[name] = _json_checksum(value)
      else:
        args[name] = ocp.args.StandardSave(value)
        checksums[name] = artifacts.tree_checksums(value)
    args[CHECKSUMS] = ocp.args.JsonSave(checksums)
    return self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(
    self,
    targets: Mapping[str, Any],
    *,
    step: int | None = None,
    optional: Sequence[str] = (),
  ) -> dict[str, Any]:
    """Restores and verifies the named items of checkpoint `step` (default: the latest good one).

    Args:
      targets: name -> restore target for array items (a pytree of arrays or
        ShapeDtypeStructs with shardings, see `abstract_target`; restored arrays
        land on those shardings), or None: JSON items, and array items restored
        as saved (an item saved from NumPy arrays comes back as NumPy arrays).
      step: which checkpoint; None means the latest one that is not damaged
        (see `restore_latest`).
      optional: names in `targets` restored only if the checkpoint has them.

    Returns:
      name -> restored value, for every name in `targets` that was restored.

    Raises:
      DamagedCheckpointError: an explicit `step` fails its checksums.
    """
    if step is None:
      return self.restore_latest(targets, optional=optional)[1]
    self._manager.wait_until_finished()
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
        f'no checkpoint of step {step} in {self.directory}; there are {self.all_steps()}'
      )
    return self._restore_step(step, targets, optional)

  def restore_latest(
    self, targets: Mapping[str, Any], *, optional: Sequence[str] = ()
  ) -> tuple[int, dict[str, Any]]:
    """Restores the newest checkpoint that passes its checksums: (its step, its items).

    A damaged checkpoint is skipped for the previous one, with a warning naming
    the damaged item folder and leaves; a later `save` of its step replaces it.

    Raises:
      FileNotFoundError: no complete checkpoint.
      DamagedCheckpointError: every checkpoint is damaged.
    """
    self._manager.wait_until_finished()
    candidates = sorted(self._manager.all_steps(), reverse=True)
    if not candidates:
      raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
    failures: list[tuple[int, Exception]] = []
    for step in candidates:
      try:
        restored = self._restore_step(step, targets, optional)
      except DamagedCheckpointError as e:
        failures.append((step, e))
      except KeyError:
        raise
      except Exception as e:  # noqa: BLE001 (Orbax raises many types for unreadable data)
        failures.append((step, e))
      else:
        for bad, error in failures:
          self._damaged.add(bad)
          logging.warning(
            'checkpoint %s is damaged and was skipped; restored step %d instead. %s: %s',
            self.directory / str(bad),
            step,
            type(error).__name__,
            error,
          )
        return step, restored
    if all(isinstance(e, DamagedCheckpointError) for _, e in failures):
      self._damaged.update(s for s, _ in failures)
      raise DamagedCheckpointError(
        f'every checkpoint in {self.directory} is damaged:\n  '
        + '\n  '.join(f'step {s}: {e}' for s, e in failures)
        + '\nDelete the checkpoint folder to start over.'
      )
    raise failures[0][1]  # the same failure everywhere: not damage, e.g. another model

  def _restore_step(
    self, step: int, targets: Mapping[str, Any], optional: Sequence[str]
  ) -> dict[str, Any]:
    saved = set(self.item_names(step))
    targets = {k: v for k, v in targets.items() if k in saved or k not in optional}
    missing = sorted(set(targets) - saved)
    if missing:
      raise KeyError(
        f'checkpoint {step} in {self.directory} has no item(s) {missing}; it has {sorted(saved)}'
      )
    args = {}
    as_saved = {name for name, target in targets.items() if isinstance(target, AsSaved)}
    for name, target in targets.items():
      if name in self._json_items:
        args[name] = ocp.args.JsonRestore()
      elif name in as_saved:
        args[name] = ocp.args.StandardRestore(self._saved_target(step, name, target.sharding))
      else:
        args[name] = ocp.args.StandardRestore(None if target is None else abstract_target(target))
    has_checksums = (self.directory / str(step) / CHECKSUMS).exists()
    if has_checksums:
      args[CHECKSUMS] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    if not has_checksums:
      logging.warning(
        'checkpoint %s has no checksums (written by an older puma_jax); restored unverified',
        self.directory / str(step),
      )
    else:
      recorded = restored[CHECKSUMS]
      for name in targets:
        if name not in recorded:
          continue
        if name in self._json_items:
          bad = [] if _json_checksum(restored[name]) == recorded[name] else ['(the JSON value)']
        elif name in as_saved:
          bad = artifacts.damaged_leaves(
            _plain_names(recorded[name]), _plain_names(artifacts.tree_checksums(restored[name]))
          )
        else:
          bad = artifacts.damaged_leaves(recorded[name], artifacts.tree_checksums(restored[name]))
        if bad:
          raise DamagedCheckpointError(
            f'{self.directory / str(step) / name}: the restored data differ from the checksums '
            f'recorded when it was saved (damaged on disk), in {", ".join(bad[:5])}'
            + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
          )
    return {name: restored[name] for name in targets}

  def _saved_target(self, step: int, name: str, sharding: jax.sharding.Sharding) -> Any:
    """The restore target of array item `name` of checkpoint `step` as saved, on `sharding`."""
    tree = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / name).tree

    def leaf(path, meta):
      if not isinstance(meta, ocp.metadata.ArrayMetadata):
        raise TypeError(
          f'checkpoint item {name!r} leaf {jax.tree_util.keystr(path)} is a '
          f'{type(meta).__name__}; AsSaved restores items of jax arrays only'
        )
      return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf, tree)

  def item_names(self, step: int) -> list[str]:
    """Names of the items saved in checkpoint `step`."""
    # Each item is a subfolder of the step folder (Orbax's default step naming).
    return sorted(
      p.name for p in (self.directory / str(step)).iterdir() if p.is_dir() and p.name != CHECKSUMS
    )

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


_NAME_PART = re.compile(r"""\[('[^']*'|"[^"]*"|-?\d+)\]|\.(\w+)""")


def _plain_names(checksums: Mapping[str, Any]) -> dict[str, Any]:
  """Leaf names with attributes written as dict keys (`.a[0].b` -> `['a'][0]['b']`)."""
  plain = lambda m: m.group(0) if m.group(1) is not None else f"['{m.group(2)}']"
  return {_NAME_PART.sub(plain, k): v for k, v in checksums.items()}


def _json_checksum(value: Any) -> str:
  return artifacts.sha256_bytes(artifacts.dumps(artifacts.canonical(value)).encode())
