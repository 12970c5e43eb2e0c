"""Per-example arrays stored beside a split's shards ("sidecars"), e.g. DeepFool margins.

For shard file `<shard>` of a split and a tag such as 'margins':

  <shard>.<tag>.npy                          [shard length] values in shard order, in the
                                             manifest's dtype (float32, int32, bool, ...)
  <shard>.<tag>.npy.sha256                   sha256 of that .npy file, written after it
  <split dir>/<split>.<tag>.manifest.json    one per split and tag

The manifest records the values' dtype, the shard names and lengths, a
fingerprint of the split's labels in global order, and a free-form `settings`
dict given by the writer (DeepFool settings, norm, candidates, margin-model
hash, ...). Loading checks every sidecar against the manifest and the dataset,
so margins are never mixed across datasets, shardings or settings, and checks
its content against its checksum (`SidecarDamagedError` names a damaged file).
A shard counts as complete when its .npy has the right header and size and its
checksum file exists. With `root`, sidecars and manifest go under `root`
instead, mirroring their path relative to the TFDS data_dir (for a read-only
data_dir). Every write is atomic (`artifacts`).

Manifests of format 1 (float32 values of every quantity, no checksums) are
refused with a message saying to recompute them.

Protocol for a writer such as the margin stage:
  1. `write_manifest(split, tag, settings)` once (process 0), before any shard:
     it returns quietly if the same manifest exists, and refuses a different one
     unless `overwrite=True`, which also deletes the old sidecars;
  2. for each shard it owns: skip it if `is_complete(...)`, else compute and
     `write_shard(...)`;
  3. readers call `load(split, tag, expected_settings)` (or `load_shard`).
"""

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from puma_jax import artifacts
from puma_jax.datasets.errors import DataError
from puma_jax.datasets.splits import Split

FORMAT = 2
CHECKSUM_SUFFIX = '.sha256'
_TAG = re.compile(r'^[A-Za-z0-9_\-]+$')


class SidecarError(DataError):
  """A sidecar or manifest that is missing, corrupt, or does not match the dataset."""


class SidecarDamagedError(SidecarError):
  """A complete sidecar whose content differs from the checksum recorded when it was written."""


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


def checksum_path(path: Path) -> Path:
  """The checksum file of sidecar `path`: `<sidecar>.npy.sha256`."""
  return path.with_name(path.name + CHECKSUM_SUFFIX)


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


def _manifest_for(
  split: Split, tag: str, settings: dict[str, Any], dtype: Any = np.float32
) -> dict[str, Any]:
  return {
    'format': FORMAT,
    'dtype': np.dtype(dtype).name,
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
  if isinstance(manifest, dict) and manifest.get('format') == 1:
    raise SidecarError(
      f'{path}: sidecars of format 1 (float32 values, no checksums), written by an older '
      'puma_jax; recompute them (main job: --config.margins.recompute=True).'
    )
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
  expected = _manifest_for(
    split, manifest.get('tag', ''), manifest.get('settings', {}), manifest.get('dtype')
  )
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
  dtype: Any = np.float32,
  root: str | os.PathLike | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the manifest of `tag` for `split` (call once, before writing shards).

  Args:
    split: the split the sidecars describe.
    tag: sidecar name, e.g. 'margins'.
    settings: JSON-able description of how the values are computed.
    dtype: the values' dtype (every shard is stored in it).
    root: sidecar root (None: beside the shards).
    overwrite: replace a different manifest, deleting the sidecars written under it.

  Returns:
    The manifest (the existing one if it already matched).

  Raises:
    SidecarError: a different manifest (or manifest-less sidecars) exists and
      `overwrite` is False.
  """
  path = manifest_path(split, tag, root)
  new = _manifest_for(split, tag, settings, dtype)
  stale = [p for k in range(split.num_shards) if (p := sidecar_path(split, tag, k, root)).exists()]
  if path.exists():
    try:
      old = read_manifest(split, tag, root)
      check_manifest(old, split, settings, path=path)
      if old['dtype'] != new['dtype']:
        raise SidecarError(f'{path}: holds {old["dtype"]} values, expected {new["dtype"]}')
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
    checksum_path(p).unlink(missing_ok=True)
  artifacts.write_json(path, new)
  return new


def write_shard(
  split: Split,
  tag: str,
  shard_id: int,
  values: np.ndarray,
  root: str | os.PathLike | None = None,
  *,
  dtype: Any = None,
) -> Path:
  """Atomically writes the values of one shard ([shard length], in shard order), then its checksum.

  The values are stored in the manifest's dtype (write the manifest first), or
  in `dtype` when the caller knows it (this saves reading the manifest per shard).

  Raises:
    SidecarError: no manifest, or the folder cannot be written (e.g. a read-only
      data_dir: the message says to set a writable sidecar root).
    ValueError: values of the wrong shape, or that the dtype cannot hold exactly.
  """
  values = np.asarray(values)
  n = split.shard_lengths[shard_id]
  if values.shape != (n,):
    raise ValueError(
      f'{split.name}:{split.split} shard {shard_id} has {n} examples; got values of shape '
      f'{values.shape}'
    )
  dtype = np.dtype(read_manifest(split, tag, root)['dtype'] if dtype is None else dtype)
  if not np.can_cast(values.dtype, dtype, 'same_kind'):
    raise ValueError(f'{tag} sidecars hold {dtype}; got values of dtype {values.dtype}')
  path = sidecar_path(split, tag, shard_id, root)
  buf = io.BytesIO()
  np.save(buf, values.astype(dtype), allow_pickle=False)
  data = buf.getvalue()
  try:
    checksum_path(path).unlink(missing_ok=True)
    artifacts.write_bytes(path, data)
    artifacts.write_text(checksum_path(path), artifacts.sha256_bytes(data) + '\n')
  except OSError as e:
    raise SidecarError(
      f'{path}: cannot write the sidecar ({e}). If the data directory is read-only, write '
      'sidecars elsewhere (main job: --config.data.sidecar_dir=<a writable folder>).'
    ) from e
  return path


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
  with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), np.dtype(dtype), f.tell()


def _check_sidecar(split: Split, shard_id: int, path: Path, dtype: np.dtype) -> None:
  """Raises SidecarError unless `path` is a complete dtype[shard length] .npy with a checksum."""
  n = split.shard_lengths[shard_id]
  if not path.exists():
    raise SidecarError(f'{path}: missing sidecar of shard {shard_id} ({n} examples)')
  try:
    shape, saved_dtype, offset = _header(path)
  except (ValueError, OSError, EOFError) as e:
    raise SidecarError(f'{path}: not a valid .npy ({e}); delete it and recompute') from e
  if shape != (n,) or saved_dtype != dtype:
    raise SidecarError(
      f'{path}: holds {saved_dtype}{list(shape)}, expected {dtype}[{n}] (the length of shard '
      f'{split.shard_paths[shard_id].name}); delete it and recompute'
    )
  size = path.stat().st_size
  if size != offset + dtype.itemsize * n:
    raise SidecarError(
      f'{path}: {size} bytes, expected {offset + dtype.itemsize * n}; the file is truncated or '
      'corrupt. Delete it and recompute.'
    )
  if not checksum_path(path).exists():
    raise SidecarError(f'{checksum_path(path)}: missing (an interrupted write); recompute')


def is_complete(
  split: Split, tag: str, shard_id: int, root: str | os.PathLike | None = None
) -> bool:
  """True if shard `shard_id` has a complete sidecar under a manifest matching the dataset.

  Reads only the manifest, the sidecar's header and size and whether its
  checksum file exists, so it is cheap enough to call for every shard of an
  ImageNet-21K-sized split. `load_shard` verifies the content.
  """
  return shard_id not in missing_shards(split, tag, root, shard_ids=[shard_id])


def load_shard(
  split: Split,
  tag: str,
  shard_id: int,
  root: str | os.PathLike | None = None,
  *,
  dtype: Any = None,
) -> np.ndarray:
  """The values of one shard ([shard length], the manifest's dtype), checked against its checksum.

  Checks the sidecar's header and size, not the manifest (see `load`); give the
  manifest's `dtype` when known, to save reading the manifest per shard.

  Raises:
    SidecarError: missing, truncated or wrong-length sidecar or checksum file.
    SidecarDamagedError: content that differs from its checksum (naming the file).
  """
  dtype = np.dtype(read_manifest(split, tag, root)['dtype'] if dtype is None else dtype)
  path = sidecar_path(split, tag, shard_id, root)
  _check_sidecar(split, shard_id, path, dtype)
  try:
    data = path.read_bytes()
    recorded = checksum_path(path).read_text().strip()
  except OSError as e:
    raise SidecarError(f'{path}: unreadable ({e}); delete it and recompute') from e
  if artifacts.sha256_bytes(data) != recorded:
    raise SidecarDamagedError(
      f'{path}: its content differs from the checksum recorded when it was written (the file '
      'is damaged); recompute it.'
    )
  return np.load(io.BytesIO(data), allow_pickle=False)


def load(
  split: Split,
  tag: str,
  expected_settings: dict[str, Any] | None = None,
  root: str | os.PathLike | None = None,
) -> np.ndarray:
  """All values of `tag` for `split`: [N] in global order, in the manifest's dtype.

  Raises:
    SidecarError: missing/corrupt manifest; a manifest that disagrees with the
      dataset (shards, labels) or with `expected_settings`; a missing, truncated
      or wrong-length sidecar. The message names the file.
    SidecarDamagedError: a sidecar whose content differs from its checksum.
  """
  mpath = manifest_path(split, tag, root)
  manifest = read_manifest(split, tag, root)
  check_manifest(manifest, split, expected_settings, path=mpath)
  out = np.empty(split.num_examples, np.dtype(manifest['dtype']))
  for k, offset in enumerate(split.shard_offsets):
    out[offset : offset + split.shard_lengths[k]] = load_shard(
      split, tag, k, root, dtype=manifest['dtype']
    )
  return out


def missing_shards(
  split: Split,
  tag: str,
  root: str | os.PathLike | None = None,
  *,
  shard_ids: list[int] | None = None,
) -> list[int]:
  """Shard ids (of `shard_ids`, default all) whose sidecar is not complete.

  All of them if the manifest is missing or stale. Cheap: content is not read.
  """
  shard_ids = list(range(split.num_shards)) if shard_ids is None else shard_ids
  try:
    manifest = read_manifest(split, tag, root)
    check_manifest(manifest, split, path=manifest_path(split, tag, root))
  except SidecarError:
    return shard_ids
  dtype = np.dtype(manifest['dtype'])
  missing = []
  for k in shard_ids:
    try:
      _check_sidecar(split, k, sidecar_path(split, tag, k, root), dtype)
    except SidecarError:
      missing.append(k)
  return missing
