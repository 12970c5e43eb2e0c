"""`Split`: a handle on one split of a built TFDS array_record dataset.

A split's examples live in shard files in a fixed global order (datasets are
written with `disable_shuffling=True`): example `i` is record `i - offset[k]` of
shard `k`. The handle gives shard paths and lengths, random access to decoded
records (`data_source`) and the labels in global order (`labels()`, saved at
build time so that ImageNet-21K-sized splits never decode images to get them).
"""

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from puma_jax import artifacts
from puma_jax.datasets.errors import DataError

SOURCE_IDS = {'real': 0, 'generated': 1}
LABELS_SUFFIX = '.labels.npy'


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a built dataset.

  Attributes:
    name: TFDS dataset name with config, e.g. 'puma_real/mnist_embedded'.
    split: split name, e.g. 'train'.
    source_id: 0 for real data, 1 for generated data (the batches' `source`).
    num_examples: examples in the split.
    num_classes: number of classes (labels are in [0, num_classes)).
    image_shape: (H, W, C) of every image (uint8 on disk).
    shard_paths: the shard files, in global order.
    shard_lengths: examples per shard, in the same order.
    dataset_dir: the versioned folder holding the shards (`<data_dir>/<name>/<version>`).
    data_dir: the TFDS data_dir (sidecars redirected elsewhere mirror paths relative to it).
    class_names: class names, if the dataset has them.
    metadata: the build metadata (what the dataset was built from).
  """

  name: str
  split: str
  source_id: int
  num_examples: int
  num_classes: int
  image_shape: tuple[int, int, int]
  shard_paths: tuple[Path, ...]
  shard_lengths: tuple[int, ...]
  dataset_dir: Path
  data_dir: Path
  class_names: tuple[str, ...] | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __repr__(self) -> str:
    return (
      f'Split({self.name}:{self.split}, source={self.source_id}, n={self.num_examples}, '
      f'classes={self.num_classes}, image={self.image_shape}, shards={self.num_shards})'
    )

  @property
  def num_shards(self) -> int:
    return len(self.shard_paths)

  @functools.cached_property
  def shard_offsets(self) -> tuple[int, ...]:
    """Global index of the first example of each shard."""
    return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.shard_lengths)[:-1]]))

  def shard_indices(self, shard_id: int) -> np.ndarray:
    """i64[shard_lengths[shard_id]]: the global indices of shard `shard_id`, in order."""
    start = self.shard_offsets[shard_id]
    return np.arange(start, start + self.shard_lengths[shard_id], dtype=np.int64)

  @property
  def builder_name(self) -> str:
    return self.name.split('/')[0]

  @property
  def labels_path(self) -> Path:
    return self.dataset_dir / f'{self.builder_name}-{self.split}{LABELS_SUFFIX}'

  @functools.cached_property
  def _builder(self) -> tfds.core.DatasetBuilder:
    return tfds.builder_from_directory(os.fspath(self.dataset_dir))

  @functools.cached_property
  def data_source(self) -> Sequence[dict[str, Any]]:
    """Random access to decoded records: `data_source[i]` is a dict with `image`
    u8[H,W,C], `label` int and `source_index` int (position in the original file)."""
    return self._builder.as_data_source(split=self.split)

  def labels(self) -> np.ndarray:
    """i32[N]: the label of every example, in global order (read from disk, cached).

    Datasets built by this package store them at build time. For a dataset
    built elsewhere they are decoded once from the records and saved beside the
    shards (kept in memory only if that folder is read-only).
    """
    return self._labels

  @functools.cached_property
  def _labels(self) -> np.ndarray:
    path = self.labels_path
    if path.exists():
      try:
        labels = np.load(path, mmap_mode='r', allow_pickle=False)
      except (ValueError, OSError) as e:
        raise DataError(f'{path}: unreadable labels file ({e}); delete it to recompute') from e
      if labels.shape != (self.num_examples,) or labels.dtype != np.int32:
        raise DataError(
          f'{path}: expected i32[{self.num_examples}] labels, got {labels.dtype}{list(labels.shape)}; '
          'the file does not belong to this dataset. Delete it to recompute.'
        )
      return np.asarray(labels)
    logging.info('%s: decoding %d labels once (no %s)', self, self.num_examples, path.name)
    source = self.data_source
    labels = np.fromiter(
      (source[i]['label'] for i in range(self.num_examples)), np.int32, self.num_examples
    )
    try:
      artifacts.save_npy(path, labels)
    except OSError as e:
      logging.warning('could not cache labels at %s (%s); keeping them in memory', path, e)
    return labels

  def labels_fingerprint(self) -> str:
    """'sha256:<hex>' of the labels (i32, little-endian) in global order."""
    return self._labels_fingerprint

  @functools.cached_property
  def _labels_fingerprint(self) -> str:
    data = np.ascontiguousarray(self.labels(), dtype='<i4').tobytes()
    return 'sha256:' + hashlib.sha256(data).hexdigest()

  def verify(self) -> None:
    """Checks that every shard file exists and holds the recorded number of records.

    Raises:
      DataError: naming the first missing or short shard.
    """
    from array_record.python import array_record_module

    for path, n in zip(self.shard_paths, self.shard_lengths, strict=True):
      if not path.exists():
        raise DataError(f'{path}: shard file missing from {self.name}:{self.split}')
      try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
        got = reader.num_records()
        reader.close()
      except Exception as e:  # noqa: BLE001 (array_record raises plain RuntimeError)
        raise DataError(f'{path}: unreadable array_record shard ({e})') from e
      if got != n:
        raise DataError(f'{path}: {got} records, the dataset info says {n}')


def open_split(
  dataset_dir: str | os.PathLike,
  split: str,
  *,
  source_id: int,
  data_dir: str | os.PathLike | None = None,
) -> Split:
  """Opens one split of a built TFDS dataset folder (the one with dataset_info.json).

  Args:
    dataset_dir: `<data_dir>/<name>[/<config>]/<version>`.
    split: split name.
    source_id: 0 real, 1 generated.
    data_dir: the TFDS data_dir; default: inferred from `dataset_dir` and the name.

  Raises:
    DataError: no dataset there, no such split, or features this package cannot read.
  """
  dataset_dir = Path(dataset_dir)
  if not (dataset_dir / 'dataset_info.json').exists():
    raise DataError(f'{dataset_dir}: no built TFDS dataset here (no dataset_info.json)')
  builder = tfds.builder_from_directory(os.fspath(dataset_dir))
  info = builder.info
  if split not in info.splits:
    raise DataError(f'{dataset_dir}: no split {split!r}; it has {sorted(info.splits.keys())}')
  features = info.features
  missing = {'image', 'label'} - set(features.keys())
  if missing:
    raise DataError(f'{dataset_dir}: features {sorted(missing)} missing; found {list(features)}')
  image_shape = tuple(int(s) for s in features['image'].shape)
  if len(image_shape) != 3 or None in image_shape or features['image'].np_dtype != np.uint8:
    raise DataError(
      f'{dataset_dir}: feature image must be a uint8 tensor of fixed shape (H, W, C); '
      f'got {features["image"].np_dtype} {image_shape}'
    )
  label = features['label']
  names = tuple(label.names) if getattr(label, 'names', None) else None
  split_info = info.splits[split]
  name = info.full_name.rsplit('/', 1)[0]  # 'builder/config/1.0.0' -> 'builder/config'
  if data_dir is None:
    data_dir = dataset_dir.parents[len(name.split('/'))]
  metadata = dict(info.metadata) if info.metadata else {}
  split_obj = Split(
    name=name,
    split=split,
    source_id=source_id,
    num_examples=int(split_info.num_examples),
    num_classes=int(label.num_classes),
    image_shape=image_shape,  # type: ignore[arg-type]
    shard_paths=tuple(Path(p) for p in split_info.filepaths),
    shard_lengths=tuple(int(n) for n in split_info.shard_lengths),
    dataset_dir=dataset_dir,
    data_dir=Path(data_dir),
    class_names=names,
    metadata=metadata,
  )
  split_obj.__dict__['_builder'] = builder  # Reuse the builder for data_source.
  return split_obj
