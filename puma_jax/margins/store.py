"""The margin sidecar store: which shards are done, what they hold, and their manifests.

Per split and quantity (margin, iterations, converged) one manifest, written by
process 0 before any shard, and one sidecar per shard (`datasets.sidecar`).
Shard k of a split belongs to process k mod P. A shard whose three sidecars
are complete under a matching manifest and pass their checksums is done (its
values are read once, here); a manifest that disagrees (model, DeepFool
settings, dataset) is refused unless `recompute`.
"""

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from puma_jax import artifacts, multihost
from puma_jax.datasets import sidecar
from puma_jax.datasets.splits import SOURCE_IDS, Split
from puma_jax.margins.settings import DTYPES

_SOURCE_NAMES = {v: k for k, v in SOURCE_IDS.items()}


def named_splits(splits: Mapping[str, Split] | Sequence[Split] | Split) -> dict[str, Split]:
  if isinstance(splits, Split):
    splits = [splits]
  if isinstance(splits, Mapping):
    named = dict(splits)
  else:
    splits = list(splits)
    sources = [s.source_id for s in splits]
    named = {}
    for s in splits:
      unique = sources.count(s.source_id) == 1 and s.source_id in _SOURCE_NAMES
      named[_SOURCE_NAMES[s.source_id] if unique else f'{s.name}:{s.split}'] = s
  if not named:
    raise ValueError('compute_margins: no splits given')
  seen = {}
  for key, s in named.items():
    if not isinstance(s, Split):
      raise TypeError(f'splits[{key!r}] is a {type(s).__name__}, not a datasets.Split')
    ident = (os.fspath(s.dataset_dir), s.split)
    if ident in seen:
      raise ValueError(f'splits {seen[ident]!r} and {key!r} are the same split {s!r}')
    seen[ident] = key
  return named


def check_existing(
  split: Split, tag: str, expected: dict[str, Any], root: Any, recompute: bool, key: str
) -> None:
  """Refuses sidecars made differently (every process runs this, so all fail alike)."""
  path = sidecar.manifest_path(split, tag, root)
  hint = (
    'To replace them, rerun with recompute=True (main job: --config.margins.recompute=True); '
    'to keep them, choose another tag or data.sidecar_dir.'
  )
  if path.exists():
    try:
      sidecar.check_manifest(sidecar.read_manifest(split, tag, root), split, expected, path=path)
    except sidecar.SidecarError as e:
      if not recompute:
        raise sidecar.SidecarError(f'{key} margins: {e}\n{hint}') from e
  elif not recompute:
    stale = [
      k for k in range(split.num_shards) if sidecar.sidecar_path(split, tag, k, root).exists()
    ]
    if stale:
      raise sidecar.SidecarError(
        f'{sidecar.sidecar_path(split, tag, stale[0], root)}: {len(stale)} {tag!r} sidecars of '
        f'{split!r} exist without a manifest, so what they hold is unknown. {hint}'
      )


@dataclasses.dataclass
class ShardBuffer:
  """One shard's results as they arrive, batch by batch."""

  key: str
  split: Split
  shard_id: int
  margin: np.ndarray
  iterations: np.ndarray
  converged: np.ndarray
  seen: np.ndarray

  @classmethod
  def create(cls, key: str, split: Split, shard_id: int) -> 'ShardBuffer':
    n = split.shard_lengths[shard_id]
    return cls(
      key,
      split,
      shard_id,
      np.zeros(n, np.float32),
      np.zeros(n, np.int32),
      np.zeros(n, bool),
      np.zeros(n, bool),
    )

  def add(self, index: np.ndarray, mask: np.ndarray, out: tuple[np.ndarray, ...]) -> int:
    rows = index[mask].astype(np.int64) - self.split.shard_offsets[self.shard_id]
    if len(rows) and (rows.min() < 0 or rows.max() >= len(self.seen) or self.seen[rows].any()):
      raise RuntimeError(
        f'{self.key} shard {self.shard_id}: a batch holds examples outside the shard or twice'
      )
    margin, iterations, converged = out
    self.seen[rows] = True
    self.margin[rows] = margin[mask]
    self.iterations[rows] = iterations[mask]
    self.converged[rows] = converged[mask]
    return len(rows)

  @property
  def complete(self) -> bool:
    return bool(self.seen.all())


def clean_temporaries(split: Split, shard_id: int, tags: Sequence[str], root: Any) -> None:
  """Removes temp files a killed writer of this shard left (only this process writes it)."""
  for tag in tags:
    path = sidecar.sidecar_path(split, tag, shard_id, root)
    for tmp in path.parent.glob(f'.{path.stem}{artifacts.TMP_MARKER}*{path.suffix}'):
      tmp.unlink(missing_ok=True)


def owned(split: Split) -> list[int]:
  """The shards of `split` this process scores: k with k mod P = p."""
  pi, pc = jax.process_index(), jax.process_count()
  return [k for k in range(split.num_shards) if k % pc == pi]


def write_manifests(
  named: Mapping[str, Split],
  tags: Mapping[str, str],
  expected: Mapping[str, dict[str, Any]],
  root: Any,
  recompute: bool,
) -> None:
  """Process 0 writes the manifests; every process learns whether that worked, then syncs."""
  error = None
  if jax.process_index() == 0:
    try:
      for split in named.values():
        for q, t in tags.items():
          sidecar.write_manifest(
            split, t, expected[q], dtype=DTYPES[q], root=root, overwrite=recompute
          )
    except Exception as e:  # noqa: BLE001 (re-raised after telling the other processes)
      error = e
  multihost.all_ok(error is None, 'writing the margin manifests')
  if error is not None:
    raise error
  multihost.barrier('puma_jax.margins.manifests')


def plan(
  named: Mapping[str, Split], tags: Mapping[str, str], root: Any
) -> tuple[list[tuple[str, Split, int]], dict[str, list[int]], dict[tuple[str, int], Any]]:
  """This process's shards still to score, and the complete ones (skipped) with their values.

  A complete shard is read and checked against its checksums here, once; a
  damaged one is scored again. Temporaries of killed writers are removed.

  Returns:
    (work, skipped, values): work as (key, split, shard id); skipped per key;
    values[(key, shard id)] = {quantity: array} of the skipped shards.
  """
  work, skipped, values = [], {}, {}
  for key, split in named.items():
    missing = set()
    for t in tags.values():
      missing.update(sidecar.missing_shards(split, t, root))
    skipped[key] = []
    for k in owned(split):
      if k not in missing:
        try:
          values[(key, k)] = {
            q: sidecar.load_shard(split, t, k, root, dtype=DTYPES[q]) for q, t in tags.items()
          }
          skipped[key].append(k)
          continue
        except sidecar.SidecarDamagedError as e:
          logging.warning('%s shard %d: %s Recomputing it.', key, k, e)
      elif sidecar.sidecar_path(split, tags['margin'], k, root).exists():
        logging.warning('%s shard %d: sidecars incomplete or corrupt; recomputing', key, k)
      clean_temporaries(split, k, list(tags.values()), root)
      work.append((key, split, k))
  return work, skipped, values


def assemble(
  named: Mapping[str, Split],
  tags: Mapping[str, str],
  root: Any,
  local: Mapping[tuple[str, int], Mapping[str, np.ndarray]],
) -> dict[str, dict[str, np.ndarray]]:
  """Per split key, {quantity: [N] in global order}: this process's values, others' read back."""
  arrays = {}
  for key, split in named.items():
    out = {q: np.empty(split.num_examples, DTYPES[q]) for q in tags}
    for k, offset in enumerate(split.shard_offsets):
      values = local.get((key, k))
      if values is None:  # another process's shard
        values = {
          q: sidecar.load_shard(split, t, k, root, dtype=DTYPES[q]) for q, t in tags.items()
        }
      for q in tags:
        out[q][offset : offset + split.shard_lengths[k]] = values[q]
    arrays[key] = out
  return arrays
