"""The grain input pipeline: training batches, evaluation batches and per-shard reads.

Training (`TrainIterator`): every global batch of B rows holds exactly
`round(generated_fraction * B)` generated rows and the rest real rows. Each
source is a `View` of a split: optionally only the kept examples (this is how
pruning is applied) with a per-example eps array aligned with them. Each source
is read in its own order, reshuffled every epoch of that source (grain's
index shuffle, seeded per source and epoch), so real and generated epochs run at
their own pace. Global batch t is a pure function of (seed, t): row positions,
the row order inside the batch and the augmentation parameters are all derived
from them. Hence:

- resuming is exact: the iterator's state is the step (plus a fingerprint that
  refuses a state from a different pipeline), a small JSON dict for Orbax;
- process p of P gets rows [p B/P, (p+1) B/P) of every global batch: the parts
  are disjoint and complete, and the global batch does not depend on P;
- augmentation (zero-padded random crop + horizontal flip) is identical after
  a resume.

grain's `MapDataset` gives random access by step and `ReadOptions` threads
prepare the next batches while the accelerator runs.

Batches are dicts of numpy arrays: `image` f32[b,H,W,C] in [0,1], `label` i32[b],
`index` i32[b] (the example's global id in its source's split), `source` i32[b]
(0 real, 1 generated), `eps` f32[b]; evaluation and shard batches add `mask`
bool[b] (False on padding rows of the last batch). Only the fields a step reads go to
the devices (`device_fields` with `TRAIN_FIELDS` or `EVAL_FIELDS`); `source`, and `eps`
in evaluation, stay on the host for bookkeeping.
"""

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from puma_jax.datasets.errors import DataError
from puma_jax.datasets.splits import SOURCE_IDS, Split

Batch = dict[str, np.ndarray]

# The fields that the train step and the evaluation steps read (`steps`, `evaluate`).
TRAIN_FIELDS = ('image', 'label', 'index', 'eps')
EVAL_FIELDS = ('image', 'label', 'index', 'mask')


def device_fields(batch: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
  """The `fields` of a host batch, to be sharded to the devices; the others stay on the host."""
  return {k: batch[k] for k in fields}


_NUM_STEPS = 1 << 62  # Training batches are indexed by step; the stream never ends.


@dataclasses.dataclass(frozen=True, eq=False)
class View:
  """The examples of one source that training draws from.

  Attributes:
    split: the split.
    indices: i64[M] global ids of the kept examples, or None for the whole split.
    eps: f32[M] attack radius of each kept example (aligned with `indices`, or with
      the whole split when `indices` is None), or None for the configured eps.
  """

  split: Split
  indices: np.ndarray | None = None
  eps: np.ndarray | None = None

  @property
  def size(self) -> int:
    return self.split.num_examples if self.indices is None else len(self.indices)

  def global_ids(self, positions: np.ndarray) -> np.ndarray:
    return positions if self.indices is None else self.indices[positions]


def make_view(
  split: Split, indices: np.ndarray | None = None, eps: np.ndarray | None = None
) -> View:
  """Checks and builds a `View` (kept indices unique and in range, eps aligned and finite)."""
  where = f'{split.name}:{split.split}'
  if indices is not None:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise DataError(f'kept indices of {where}: expected a 1-D integer array, got {indices.dtype}')
    indices = indices.astype(np.int64)
    if len(indices) == 0:
      raise DataError(f'kept indices of {where}: empty; keep at least one example')
    if indices.min() < 0 or indices.max() >= split.num_examples:
      raise DataError(
        f'kept indices of {where}: out of range [0, {split.num_examples}) '
        f'(min {indices.min()}, max {indices.max()})'
      )
    if len(np.unique(indices)) != len(indices):
      raise DataError(f'kept indices of {where}: contain duplicates')
  n = split.num_examples if indices is None else len(indices)
  if eps is not None:
    eps = np.asarray(eps, dtype=np.float32)
    if eps.shape != (n,):
      raise DataError(
        f'per-example eps of {where}: shape {eps.shape}, expected ({n},) (one per kept example)'
      )
    if not np.all(np.isfinite(eps)):
      raise DataError(f'per-example eps of {where}: contains NaN or inf')
  return View(split, indices, eps)


def _source_seed(seed: int, source_id: int, purpose: int) -> int:
  return int(np.random.SeedSequence([seed, source_id, purpose]).generate_state(1)[0])


def read_examples(split: Split, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Decodes examples `ids` of `split`: images u8[n,H,W,C], labels i32[n]."""
  if len(ids) == 0:
    return np.zeros((0, *split.image_shape), np.uint8), np.zeros(0, np.int32)
  records = split.data_source.__getitems__([int(i) for i in ids])
  images = np.stack([r['image'] for r in records])
  labels = np.fromiter((r['label'] for r in records), np.int32, len(records))
  return images, labels


def crop_and_flip(
  images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, padding: int
) -> np.ndarray:
  """Random-crop (after zero padding) and horizontal-flip augmentation, vectorised.

  Args:
    images: u8[n,H,W,C].
    offsets: i64[n,2] crop corner (y, x) in the padded image, each in [0, 2 * padding].
    flips: bool[n], flip left-right.
    padding: zero padding on each side.

  Returns:
    u8[n,H,W,C].
  """
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = offsets[:, :1] + np.arange(h)
  cols = offsets[:, 1:] + np.arange(w)
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


class _Steps:
  """Random-access sequence: element t is this process's part of global batch t."""

  def __init__(self, it: 'TrainIterator'):
    self._it = it

  def __len__(self) -> int:
    return _NUM_STEPS

  def __getitem__(self, step: int) -> Batch:
    return self._it.batch_at(step)


class TrainIterator(grain.DatasetIterator):
  """Endless, deterministic, resumable training batches for this process.

  `next(it)` is this process's part of global batch `it.step`; `get_state()` /
  `set_state()` save and restore the position (a JSON-able dict), also through
  grain's Orbax checkpoint handler. `batch_at(step)` computes any batch directly.
  """

  def __init__(
    self,
    views: Mapping[str, View],
    *,
    batch_size: int,
    generated_fraction: float,
    eps: float,
    seed: int,
    augment: bool = False,
    crop_padding: int = 4,
    process_index: int = 0,
    process_count: int = 1,
    read_threads: int = 4,
    prefetch_batches: int = 4,
  ):
    """See `train_iterator` for the arguments."""
    super().__init__()
    self._inner: grain.DatasetIterator | None = None
    unknown = set(views) - set(SOURCE_IDS)
    if unknown:
      raise ValueError(f'unknown sources {sorted(unknown)}; known: {sorted(SOURCE_IDS)}')
    if not 0.0 <= generated_fraction <= 1.0:
      raise DataError(f'data.generated_fraction={generated_fraction}: must be in [0, 1]')
    n_gen = int(round(generated_fraction * batch_size))
    counts = {'real': batch_size - n_gen, 'generated': n_gen}
    for name, count in counts.items():
      if count and name not in views:
        raise DataError(
          f'{count} of every {batch_size} rows should come from {name} data '
          f'(data.generated_fraction={generated_fraction}) but there is no {name} split; '
          + (
            'set data.generated_fraction=0 or configure data.generated.'
            if name == 'generated'
            else 'set data.generated_fraction=1 or provide real data.'
          )
        )
    if batch_size % process_count:
      raise DataError(f'batch size {batch_size} is not divisible by the {process_count} processes')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    shapes = {(v.split.image_shape, v.split.num_classes) for v in views.values()}
    if len(shapes) > 1:
      raise DataError(
        'real and generated splits differ in image shape or number of classes: '
        + ', '.join(f'{k}: {v.split!r}' for k, v in views.items())
      )
    self.views = dict(views)
    for v in self.views.values():
      _ = v.split.data_source  # Open the readers here, not concurrently in grain's threads.
    self.batch_size = batch_size
    self.counts = {k: v for k, v in counts.items() if v}
    self.eps = float(eps)
    self.seed = int(seed)
    self.augment = bool(augment)
    self.crop_padding = int(crop_padding)
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = batch_size // process_count
    self._read_options = grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=prefetch_batches
    )
    # Per source: view position of stream position p is order[p] (new order each epoch).
    self._orders = {
      name: grain.MapDataset.range(self.views[name].size).shuffle(
        seed=_source_seed(self.seed, SOURCE_IDS[name], 0)
      )
      for name in self.counts
    }
    # Layout of a global batch before its per-step permutation: (source, row-in-source).
    self._layout_source = np.concatenate(
      [np.full(c, SOURCE_IDS[name], np.int32) for name, c in self.counts.items()]
    )
    self._layout_row = np.concatenate([np.arange(c) for c in self.counts.values()])
    self.fingerprint = self._fingerprint()
    self.step = 0

  def _fingerprint(self) -> str:
    desc = {
      'batch_size': self.batch_size,
      'counts': self.counts,
      'eps': self.eps,
      'seed': self.seed,
      'augment': self.augment,
      'crop_padding': self.crop_padding,
      'views': {
        name: {
          'split': f'{v.split.name}:{v.split.split}',
          'num_examples': v.split.num_examples,
          'kept': v.size,
        }
        for name, v in sorted(self.views.items())
        if name in self.counts
      },
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

  @property
  def steps_per_epoch(self) -> dict[str, float]:
    """Batches per epoch of each source (kept examples / rows per batch)."""
    return {k: self.views[k].size / c for k, c in self.counts.items()}

  def batch_at(self, step: int) -> Batch:
    """This process's part of global batch `step` (a pure function of seed and step)."""
    rng = np.random.default_rng([self.seed, 1, step])
    perm = rng.permutation(self.batch_size)
    lo = self.process_index * self.local_batch_size
    rows = perm[lo : lo + self.local_batch_size]
    source = self._layout_source[rows]
    if self.augment:
      # Drawn for the whole global batch, so a row's crop does not depend on P.
      offsets = rng.integers(0, 2 * self.crop_padding + 1, (self.batch_size, 2))[rows]
      flips = rng.random(self.batch_size)[rows] < 0.5
    b = len(rows)
    out = {
      'image': np.empty((b, *self._image_shape()), np.float32),
      'label': np.empty(b, np.int32),
      'index': np.empty(b, np.int32),
      'source': source.astype(np.int32),
      'eps': np.full(b, self.eps, np.float32),
    }
    for name, count in self.counts.items():
      sel = np.flatnonzero(source == SOURCE_IDS[name])
      if not len(sel):
        continue
      view = self.views[name]
      stream = step * count + self._layout_row[rows[sel]]
      positions = np.fromiter((self._orders[name][int(p)] for p in stream), np.int64, len(sel))
      ids = view.global_ids(positions)
      images, labels = read_examples(view.split, ids)
      if self.augment:
        images = crop_and_flip(images, offsets[sel], flips[sel], self.crop_padding)
      out['image'][sel] = images.astype(np.float32) / 255.0
      out['label'][sel] = labels
      out['index'][sel] = ids
      if view.eps is not None:
        out['eps'][sel] = view.eps[positions]
    return out

  @property
  def kept_eps(self) -> dict[str, np.ndarray]:
    """source -> f32[M] the per-example eps in use (sources that have them)."""
    return {name: v.eps for name, v in self.views.items() if v.eps is not None}

  def set_kept_eps(self, kept_eps: Mapping[str, np.ndarray]) -> None:
    """Replaces the per-example eps of the given sources (aligned with their kept ids).

    Batches from the current step on use them (batches read ahead are dropped and
    read again). Refreshed margins (`margins.refresh`) use this; the kept ids, and
    so the iterator's fingerprint, do not change.
    """
    unknown = set(kept_eps) - set(self.views)
    if unknown:
      raise ValueError(f'eps given for sources {sorted(unknown)} that have no view')
    for name, eps in kept_eps.items():
      view = self.views[name]
      self.views[name] = make_view(view.split, view.indices, eps)
    self._close_inner()

  def _image_shape(self) -> tuple[int, ...]:
    return next(iter(self.views.values())).split.image_shape

  def _start(self) -> None:
    ds = grain.MapDataset.source(_Steps(self))[self.step :]
    self._inner = iter(ds.to_iter_dataset(self._read_options))

  def __next__(self) -> Batch:
    if self._inner is None:
      self._start()
    batch = next(self._inner)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'step': self.step, 'fingerprint': self.fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('fingerprint') != self.fingerprint:
      raise DataError(
        f'the saved data-iterator state was made by a different input pipeline '
        f'(fingerprint {state.get("fingerprint")} vs {self.fingerprint}: batch size, mixing, '
        'seed, eps, augmentation or the number of kept examples changed); resume with the same '
        'settings or start a new workdir.'
      )
    self._close_inner()
    self.step = int(state['step'])

  def _close_inner(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def close(self) -> None:
    self._close_inner()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def train_iterator(
  splits: Mapping[str, Split],
  *,
  batch_size: int,
  eps: float,
  seed: int,
  generated_fraction: float = 0.7,
  kept: Mapping[str, np.ndarray] | None = None,
  kept_eps: Mapping[str, np.ndarray] | None = None,
  augment: bool = False,
  crop_padding: int = 4,
  process_index: int | None = None,
  process_count: int | None = None,
  read_threads: int = 4,
  prefetch_batches: int = 4,
) -> TrainIterator:
  """Training batches mixing real and generated data.

  Args:
    splits: {'real': Split, 'generated': Split} (either may be absent if unused).
    batch_size: global batch size B.
    eps: attack radius of examples without a per-example eps.
    seed: seed of the order, batch layout and augmentation.
    generated_fraction: exactly round(fraction * B) rows of each batch are generated.
    kept: per source, i64[M] global ids to draw from (pruning); absent: all examples.
    kept_eps: per source, f32[M] eps aligned with `kept[source]` (or with the whole
      split if that source has no kept array); absent: the constant `eps`.
    augment: zero-padded random crop + horizontal flip.
    crop_padding: padding of the random crop.
    process_index, process_count: this process's part of each batch (default: JAX's).
    read_threads: grain threads preparing batches (0: in the calling thread).
    prefetch_batches: batches prepared ahead.

  Returns:
    A `TrainIterator`.
  """
  kept, kept_eps = dict(kept or {}), dict(kept_eps or {})
  unknown = (set(kept) | set(kept_eps)) - set(splits)
  if unknown:
    raise DataError(f'kept/eps given for sources {sorted(unknown)} that have no split')
  views = {
    name: make_view(split, kept.get(name), kept_eps.get(name)) for name, split in splits.items()
  }
  pi, pc = _process(process_index, process_count)
  return TrainIterator(
    views,
    batch_size=batch_size,
    generated_fraction=generated_fraction,
    eps=eps,
    seed=seed,
    augment=augment,
    crop_padding=crop_padding,
    process_index=pi,
    process_count=pc,
    read_threads=read_threads,
    prefetch_batches=prefetch_batches,
  )


def train_iterator_from_config(
  data_config: Any,
  splits: Mapping[str, Split],
  *,
  batch_size: int,
  eps: float,
  seed: int,
  kept: Mapping[str, np.ndarray] | None = None,
  kept_eps: Mapping[str, np.ndarray] | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> TrainIterator:
  """`train_iterator` with mixing, augmentation and reading options from `config.data`."""
  return train_iterator(
    splits,
    batch_size=batch_size,
    eps=eps,
    seed=seed,
    generated_fraction=data_config.generated_fraction if 'generated' in splits else 0.0,
    kept=kept,
    kept_eps=kept_eps,
    augment=data_config.augment,
    crop_padding=data_config.crop_padding,
    process_index=process_index,
    process_count=process_count,
    read_threads=data_config.read_threads,
    prefetch_batches=data_config.prefetch_batches,
  )


class _PaddedBatches:
  """Random-access batches over given global ids, each padded to `batch_size` rows."""

  def __init__(self, split: Split, per_batch: list[np.ndarray], batch_size: int, eps: float):
    self.split, self.per_batch = split, per_batch
    self.batch_size, self.eps = batch_size, float(eps)

  def __len__(self) -> int:
    return len(self.per_batch)

  def __getitem__(self, b: int) -> Batch:
    chunk = self.per_batch[b]
    n = len(chunk)
    mask = np.zeros(self.batch_size, bool)
    mask[:n] = True
    ids = np.full(self.batch_size, chunk[0] if n else 0, np.int64)
    ids[:n] = chunk
    images, labels = read_examples(self.split, ids)
    return {
      'image': images.astype(np.float32) / 255.0,
      'label': labels,
      'index': ids.astype(np.int32),
      'source': np.full(self.batch_size, self.split.source_id, np.int32),
      'eps': np.full(self.batch_size, self.eps, np.float32),
      'mask': mask,
    }


def _padded_batches(
  split: Split,
  per_batch: list[np.ndarray],
  batch_size: int,
  eps: float,
  threads: int,
  prefetch: int,
) -> grain.IterDataset:
  _ = split.data_source  # Open the readers here, not concurrently in grain's threads.
  return grain.MapDataset.source(_PaddedBatches(split, per_batch, batch_size, eps)).to_iter_dataset(
    grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
  )


def eval_batches(
  split: Split,
  *,
  batch_size: int,
  num_examples: int = 0,
  eps: float = 0.0,
  process_index: int | None = None,
  process_count: int | None = None,
  read_threads: int = 4,
  prefetch_batches: int = 4,
  batch_indices: Sequence[int] | None = None,
) -> grain.IterDataset:
  """Evaluation batches: the first `num_examples` (0: all) in order, last batch padded.

  Global batch b holds examples [b B, (b+1) B); this process gets rows
  [p B/P, (p+1) B/P) of it, padded to B/P rows with `mask` False, so that every
  process yields the same number of equally shaped batches.

  `batch_indices` restricts the output to those global batches (in that order),
  so a resumed evaluation reads only what it has not done yet.

  Returns:
    An iterable (grain IterDataset) of batches with `mask`; iterate it once per evaluation.
  """
  pi, pc = _process(process_index, process_count)
  if batch_size % pc:
    raise DataError(f'eval batch size {batch_size} is not divisible by the {pc} processes')
  n = split.num_examples if not num_examples else min(num_examples, split.num_examples)
  local = batch_size // pc
  num_batches = math.ceil(n / batch_size)
  # Global rows of this process, batch by batch; rows past n are padding.
  rows = np.arange(num_batches)[:, None] * batch_size + pi * local + np.arange(local)
  per_batch = [r[r < n] for r in rows]
  if batch_indices is not None:  # Only these batches (a resumed evaluation), in this order.
    per_batch = [per_batch[b] for b in batch_indices]
  return _padded_batches(split, per_batch, local, eps, read_threads, prefetch_batches)


def shard_batches(
  split: Split,
  shard_id: int,
  *,
  batch_size: int,
  read_threads: int = 4,
  prefetch_batches: int = 4,
) -> grain.IterDataset:
  """All examples of one shard, in order, in batches of `batch_size` (last one padded).

  For the margin stage: `index` holds the global ids (`split.shard_indices(shard_id)`),
  `mask` marks real rows, and grain threads read ahead so that I/O overlaps compute.
  """
  ids = split.shard_indices(shard_id)
  per_batch = [ids[a : a + batch_size] for a in range(0, len(ids), batch_size)]
  return _padded_batches(split, per_batch, batch_size, 0.0, read_threads, prefetch_batches)


class _ShardsBatches:
  """Random-access batches of several shards, one after the other, each batch tagged by its part."""

  def __init__(self, parts: Sequence[tuple[Split, int]], batch_size: int):
    self.batches = []  # (part, PaddedBatches, batch number in it)
    for p, (split, shard_id) in enumerate(parts):
      ids = split.shard_indices(shard_id)
      per_batch = [ids[a : a + batch_size] for a in range(0, len(ids), batch_size)]
      source = _PaddedBatches(split, per_batch, batch_size, 0.0)
      self.batches += [(p, source, b) for b in range(len(per_batch))]

  def __len__(self) -> int:
    return len(self.batches)

  def __getitem__(self, i: int) -> Batch:
    part, source, b = self.batches[i]
    return {**source[b], 'part': np.int32(part)}


def shards_batches(
  parts: Sequence[tuple[Split, int]],
  *,
  batch_size: int,
  read_threads: int = 4,
  prefetch_batches: int = 4,
) -> grain.IterDataset:
  """The batches of several shards in order: `shard_batches` of each part, one after the other.

  Every batch also holds `part`: the position of its (split, shard id) in
  `parts`. grain threads read ahead across shard boundaries, so the next shard
  is read while this one computes.
  """
  for split, _ in parts:
    _ = split.data_source  # Open the readers here, not concurrently in grain's threads.
  return grain.MapDataset.source(_ShardsBatches(parts, batch_size)).to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
  )
