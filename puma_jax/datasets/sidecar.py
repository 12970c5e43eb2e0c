"""Per-example arrays stored beside a split's shards ("sidecars"), e.g. DeepFool margins.

For shard file `<shard>` of a split and a tag such as 'margins':

  <shard>.<tag>.npy                          f32[shard length], in shard order
  <split dir>/<split>.<tag>.manifest.json    one per split and tag

The manifest records the shard names and lengths, a fingerprint of the split's
labels in global order, and a free-form `settings` dict given by the writer
(DeepFool settings, norm, candidates, margin-model hash, ...). Loading checks
every sidecar against the manifest and the dataset, so margins are never mixed
across datasets, shardings or settings. With `root`, sidecars and manifest go
under `root` instead, mirroring their path relative to the TFDS data_dir (for a
read-only data_dir). Every write is atomic (temporary file + `os.replace`).

Protocol for a writer such as the margin stage:
  1. `write_manifest(split, tag, settings)` once (process 0), before any shard:
     it returns quietly if the same manifest exists, and refuses a different one
     unless `overwrite=True`, which also deletes the old sidecars;
  2. for each shard it owns: skip it if `is_complete(...)`, else compute and
     `write_shard(...)`;
  3. readers call `load(split, tag, expected_settings)`.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from puma_jax import artifacts
from puma_jax.datasets.errors import DataError
from puma_jax.datasets.splits import Split

FORMAT = 1
_TAG = re.compile(r'^[A-Za-z0-9_\-]+$')


class SidecarError(DataError):
  """A sidecar or manifest that is missing, corrupt, or does not match the dataset."""


def _check_tag(tag: str) -> None:
  if not _TAG.match(tag):
    raise ValueError(f'sidecar tag {tag!r}: use letters, digits, "_" and "-" only')


def _relative_dir(split: Split) -> Path:
  try:
    return split.dataset_dir.relative_to(split.data_dir)
  except ValueError:
    return Path(split.name) / split.dataset_dir.name


def _dir(split: Split, root: str | os.PathLike | None) -> Path:
  return split.dataset_dir if root is None else Path(root) / _relative_dir(split)


def sidecar_path(
  split: Split, tag: str, shard_id: int, root: str | os.PathLike | None = None
) -> Path:
  """`<shard file>.<tag>.npy`, beside the shard or at the same relative path under `root`."""
  _check_tag(tag)
  return _dir(split, root) / f'{split.shard_paths[shard_id].name}.{tag}.npy'


def manifest_path(split: Split, tag: str, root: str | os.PathLike | None = None) -> Path:
  """`<split dir>/<split>.<tag>.manifest.json` (under `root` if given)."""
  _check_tag(tag)
  return _dir(split, root) / f'{split.split}.{tag}.manifest.json'


def _normalise(settings: Any) -> Any:
  try:
    return artifacts.canonical(settings)
  except TypeError as e:
    raise TypeError(
      f'sidecar settings must be JSON-serialisable (numbers, strings, lists): {e}'
    ) from e


def _manifest_for(split: Split, tag: str, settings: dict[str, Any]) -> dict[str, Any]:
  return {
    'format': FORMAT,
    'dataset': split.name,
    'split': split.split,
    'tag': tag,
    'num_examples': split.num_examples,
    'shards': [
      {'file': p.name, 'length': n}
      for p, n in zip(split.shard_paths, split.shard_lengths, strict=True)
    ],
    'labels_fingerprint': split.labels_fingerprint(),
    'settings': _normalise(settings),
  }


def read_manifest(split: Split, tag: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
  """The manifest of `tag` for `split`.

  Raises:
    SidecarError: missing or unreadable manifest (naming the file).
  """
  path = manifest_path(split, tag, root)
  if not path.exists():
    raise SidecarError(
      f'{path}: no {tag!r} manifest for {split.name}:{split.split}; the sidecars have not been '
      'written (run the stage that computes them).'
    )
  try:
    manifest = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError) as e:
    raise SidecarError(f'{path}: unreadable manifest ({e}); delete it and recompute') from e
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise SidecarError(f'{path}: not a format-{FORMAT} sidecar manifest; delete it and recompute')
  return manifest


def check_manifest(
  manifest: dict[str, Any],
  split: Split,
  expected_settings: dict[str, Any] | None = None,
  *,
  path: Path | str = 'manifest',
) -> None:
  """Checks a manifest against the dataset (shards, labels) and, if given, the settings.

  Raises:
    SidecarError: naming the manifest and what differs.
  """
  expected = _manifest_for(split, manifest.get('tag', ''), manifest.get('settings', {}))
  for key, what in (
    ('dataset', 'dataset'),
    ('split', 'split'),
    ('shards', 'shard files or lengths'),
    ('labels_fingerprint', 'labels (in global order)'),
  ):
    if manifest.get(key) != expected[key]:
      raise SidecarError(
        f'{path}: its {what} differ from {split.name}:{split.split} as built now '
        f'({key}: {manifest.get(key)!r:.200} vs {expected[key]!r:.200}); the dataset was rebuilt '
        'or the sidecars belong to another dataset. Recompute them.'
      )
  if expected_settings is not None:
    artifacts.check_same(
      manifest.get('settings'),
      _normalise(expected_settings),
      what=f'{path}: the sidecars',
      fix='Recompute them, or use the settings they were computed with.',
      error=SidecarError,
    )


def write_manifest(
  split: Split,
  tag: str,
  settings: dict[str, Any],
  *,
  root: str | os.PathLike | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the manifest of `tag` for `split` (call once, before writing shards).

  Args:
    split: the split the sidecars describe.
    tag: sidecar name, e.g. 'margins'.
    settings: JSON-able description of how the values are computed.
    root: sidecar root (None: beside the shards).
    overwrite: replace a different manifest, deleting the sidecars written under it.

  Returns:
    The manifest (the existing one if it already matched).

  Raises:
    SidecarError: a different manifest (or manifest-less sidecars) exists and
      `overwrite` is False.
  """
  path = manifest_path(split, tag, root)
  new = _manifest_for(split, tag, settings)
  stale = [p for k in range(split.num_shards) if (p := sidecar_path(split, tag, k, root)).exists()]
  if path.exists():
    try:
      old = read_manifest(split, tag, root)
      check_manifest(old, split, settings, path=path)
      return old
    except SidecarError as e:
      if not overwrite:
        raise SidecarError(f'{e}\n(write_manifest: pass overwrite=True to replace them)') from e
  elif stale and not overwrite:
    raise SidecarError(
      f'{stale[0].parent}: {len(stale)} {tag!r} sidecars exist without a manifest, so what they '
      'hold is unknown; delete them or pass overwrite=True.'
    )
  for p in stale:
    p.unlink()
  artifacts.write_json(path, new)
  return new


def write_shard(
  split: Split,
  tag: str,
  shard_id: int,
  values: np.ndarray,
  root: str | os.PathLike | None = None,
) -> Path:
  """Atomically writes the values of one shard (f32[shard length], in shard order)."""
  values = np.asarray(values)
  n = split.shard_lengths[shard_id]
  if values.shape != (n,):
    raise ValueError(
      f'{split.name}:{split.split} shard {shard_id} has {n} examples; got values of shape '
      f'{values.shape}'
    )
  if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
    raise ValueError(f'sidecar values must be numbers, got dtype {values.dtype}')
  return artifacts.save_npy(sidecar_path(split, tag, shard_id, root), values.astype(np.float32))


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
  with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), np.dtype(dtype), f.tell()


def _check_sidecar(split: Split, shard_id: int, path: Path) -> None:
  """Raises SidecarError unless `path` is a complete f32[shard length] .npy."""
  n = split.shard_lengths[shard_id]
  if not path.exists():
    raise SidecarError(f'{path}: missing sidecar of shard {shard_id} ({n} examples)')
  try:
    shape, dtype, offset = _header(path)
  except (ValueError, OSError, EOFError) as e:
    raise SidecarError(f'{path}: not a valid .npy ({e}); delete it and recompute') from e
  if shape != (n,) or dtype != np.float32:
    raise SidecarError(
      f'{path}: holds {dtype}{list(shape)}, expected float32[{n}] (the length of shard '
      f'{split.shard_paths[shard_id].name}); delete it and recompute'
    )
  size = path.stat().st_size
  if size != offset + 4 * n:
    raise SidecarError(
      f'{path}: {size} bytes, expected {offset + 4 * n}; the file is truncated or corrupt. '
      'Delete it and recompute.'
    )


def is_complete(
  split: Split, tag: str, shard_id: int, root: str | os.PathLike | None = None
) -> bool:
  """True if shard `shard_id` has a complete sidecar under a manifest matching the dataset.

  Reads only the manifest and the sidecar's header and size, so it is cheap
  enough to call for every shard of an ImageNet-21K-sized split.
  """
  try:
    check_manifest(read_manifest(split, tag, root), split, path=manifest_path(split, tag, root))
    _check_sidecar(split, shard_id, sidecar_path(split, tag, shard_id, root))
  except SidecarError:
    return False
  return True


def load(
  split: Split,
  tag: str,
  expected_settings: dict[str, Any] | None = None,
  root: str | os.PathLike | None = None,
) -> np.ndarray:
  """All values of `tag` for `split`: f32[N] in global order.

  Raises:
    SidecarError: missing/corrupt manifest; a manifest that disagrees with the
      dataset (shards, labels) or with `expected_settings`; a missing, truncated
      or wrong-length sidecar. The message names the file.
  """
  mpath = manifest_path(split, tag, root)
  check_manifest(read_manifest(split, tag, root), split, expected_settings, path=mpath)
  out = np.empty(split.num_examples, np.float32)
  for k, offset in enumerate(split.shard_offsets):
    path = sidecar_path(split, tag, k, root)
    _check_sidecar(split, k, path)
    try:
      out[offset : offset + split.shard_lengths[k]] = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
      raise SidecarError(f'{path}: unreadable ({e}); delete it and recompute') from e
  return out


def missing_shards(split: Split, tag: str, root: str | os.PathLike | None = None) -> list[int]:
  """Shard ids whose sidecar is not complete (all of them if the manifest is missing or stale)."""
  try:
    check_manifest(read_manifest(split, tag, root), split, path=manifest_path(split, tag, root))
  except SidecarError:
    return list(range(split.num_shards))
  missing = []
  for k in range(split.num_shards):
    try:
      _check_sidecar(split, k, sidecar_path(split, tag, k, root))
    except SidecarError:
      missing.append(k)
  return missing
