"""TFDS array_record builders for in-order image arrays (no TensorFlow, no network).

Every dataset of this package is written by a `tfds.core.ShardBasedBuilder`,
which writes each shard from its own example iterator, in order, straight to
its array_record file (no shuffle buffer, no whole-split pass in memory): the
global example index is the position in the source, and a chosen number of
shards. Features: `image` (a uint8 tensor stored as raw bytes, no PNG codec), `label`
(ClassLabel) and `source_index` (int64: the row in the original file/archive).

TFDS writes into `<dataset dir>.incomplete*` and renames it only when every
shard, the dataset info and the labels file are written, so an interrupted or
failed build leaves no dataset behind. Memory: TFDS's shard writer holds the
examples of one shard until the shard is written, so a shard of raw images
should stay well under the host's memory (a few hundred MB to 1 GB is typical).
"""

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from puma_jax import artifacts
from puma_jax.datasets import splits
from puma_jax.datasets.errors import DataError

VERSION = '1.0.0'
CHUNK_ROWS = 4096
SHARD_BYTES_WARNING = 2 << 30
_CONFIG_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.\-]*$')


@dataclasses.dataclass
class ArraySplit:
  """The rows of one split, as a builder reads them.

  Attributes:
    labels: i64[N] labels, already checked to be in [0, num_classes).
    read_images: `(start, stop) -> u8[stop - start, H, W, C]`, rows in order. Called
      with increasing, contiguous ranges, so a streaming reader never seeks back.
    source_index: i64[N], the row of each example in the original file; default 0..N-1.
  """

  labels: np.ndarray
  read_images: Callable[[int, int], np.ndarray]
  source_index: np.ndarray | None = None

  @property
  def num_examples(self) -> int:
    return len(self.labels)


def shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard: contiguous, in order, lengths differing by at most one."""
  cuts = [(k * num_examples) // num_shards for k in range(num_shards + 1)]
  return list(zip(cuts[:-1], cuts[1:], strict=True))


def features(
  image_shape: tuple[int, int, int], num_classes: int, class_names: tuple[str, ...] | None = None
) -> tfds.features.FeaturesDict:
  """The features of every dataset of this package (also written by the image-folder converter).

  Args:
    image_shape: (H, W, C) of the uint8 images.
    num_classes: labels are in [0, num_classes).
    class_names: optional names, one per class (then `num_classes` is their number).
  """
  if class_names:
    label = tfds.features.ClassLabel(names=list(class_names))
  else:
    label = tfds.features.ClassLabel(num_classes=num_classes)
  return tfds.features.FeaturesDict(
    {
      # Raw bytes: one bytes field per image. (Without an encoding TFDS stores a uint8
      # tensor as a list of int64 varints: ~8x slower to write and read.)
      'image': tfds.features.Tensor(
        shape=tuple(image_shape), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
      ),
      'label': label,
      'source_index': tfds.features.Scalar(dtype=np.int64),
    }
  )


class _ImageArrays(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Writes in-order image arrays to array_record shards (see the module docstring)."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(
    self,
    *,
    arrays: Mapping[str, ArraySplit] | None = None,
    image_shape: tuple[int, int, int] = (1, 1, 1),
    num_classes: int = 1,
    class_names: tuple[str, ...] | None = None,
    num_shards: int = 1,
    build_spec: Mapping[str, Any] | None = None,
    **kwargs: Any,
  ):
    self._arrays = dict(arrays or {})
    self._image_shape = tuple(image_shape)
    self._num_classes = num_classes
    self._class_names = class_names
    self._num_shards = num_shards
    self._build_spec = dict(build_spec or {})
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=features(self._image_shape, self._num_classes, self._class_names),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(puma=self._build_spec),
    )

  def _shard_iterators_per_split(self, dl_manager):
    del dl_manager
    return {
      name: [
        _ShardExamples(self, name, arrays, a, b)
        for a, b in shard_bounds(arrays.num_examples, self._num_shards)
      ]
      for name, arrays in self._arrays.items()
    }

  # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared"
  # around every build. These builders download nothing; they log what they do instead.
  def _log_download_bytes(self) -> None:
    logging.info(
      'writing dataset %s to %s (from local arrays; nothing is downloaded)',
      self.name,
      self.data_dir,
    )

  def _log_download_done(self) -> None:
    logging.info('dataset %s written to %s', self.name, self.data_dir)

  def _download_and_prepare(self, dl_manager, download_config=None) -> None:
    super()._download_and_prepare(dl_manager, download_config)
    # Still inside TFDS's incomplete folder: the labels become visible with the shards.
    for name, arrays in self._arrays.items():
      artifacts.save_npy(
        self.data_path / f'{self.name}-{name}{splits.LABELS_SUFFIX}',
        arrays.labels.astype(np.int32),
      )


@dataclasses.dataclass
class _ShardExamples:
  """Yields (key, example) for rows [start, stop) of one split (a TFDS ExampleGeneratorFn)."""

  builder: _ImageArrays
  split: str
  arrays: ArraySplit
  start: int
  stop: int

  def __call__(self):
    shape = self.builder._image_shape  # noqa: SLF001
    labels = self.arrays.labels
    src = self.arrays.source_index
    for a in range(self.start, self.stop, CHUNK_ROWS):
      b = min(self.stop, a + CHUNK_ROWS)
      images = self.arrays.read_images(a, b)
      if images.dtype != np.uint8 or images.shape != (b - a, *shape):
        raise DataError(
          f'{self.builder.name}:{self.split}: rows [{a}, {b}) read as {images.dtype}'
          f'{list(images.shape)}; expected uint8{[b - a, *shape]}'
        )
      for j in range(b - a):
        i = a + j
        yield (
          i,
          {
            'image': images[j],
            'label': int(labels[i]),
            'source_index': int(i if src is None else src[i]),
          },
        )


class PumaReal(_ImageArrays):
  """Real images (embedded MNIST, CIFAR-10/100), in the original order."""


class PumaGenerated(_ImageArrays):
  """Generated images (DM-Improves-AT .npz format or the embedded generator), in file order."""


BUILDERS = {'puma_real': PumaReal, 'puma_generated': PumaGenerated}


def check_config_name(name: str, field: str) -> str:
  if not _CONFIG_NAME.match(name or ''):
    raise DataError(
      f'{field}={name!r} is not a valid dataset name: use letters, digits, "_", "-" and "." '
      '(starting with a letter or digit).'
    )
  return name


def dataset_dir(data_dir: str | os.PathLike, builder: str, config_name: str) -> Path:
  """Where `build` puts a dataset: `<data_dir>/<builder>/<config_name>/<version>`."""
  return Path(data_dir) / builder / config_name / VERSION


def build(
  builder: str,
  config_name: str,
  *,
  data_dir: str | os.PathLike,
  arrays: Mapping[str, ArraySplit],
  image_shape: tuple[int, int, int],
  num_classes: int,
  num_shards: int,
  build_spec: Mapping[str, Any],
  class_names: tuple[str, ...] | None = None,
  description: str = '',
) -> Path:
  """Writes a dataset (all of `arrays`' splits) and returns its folder.

  Args:
    builder: 'puma_real' or 'puma_generated'.
    config_name: the dataset's config name (folder), e.g. 'mnist_embedded'.
    data_dir: the TFDS data_dir.
    arrays: split name -> rows to write.
    image_shape: (H, W, C).
    num_classes: labels are in [0, num_classes).
    num_shards: shards per split (each split gets min(num_shards, N) shards).
    build_spec: what the dataset is built from (JSON-able), saved in its metadata;
      `prepare` compares it with the config before reusing a dataset.
    class_names: optional class names.
    description: the builder config's description.

  Raises:
    DataError: bad arguments, or a source failed while being read (nothing is left).
  """
  if builder not in BUILDERS:
    raise ValueError(f'unknown builder {builder!r}; known: {sorted(BUILDERS)}')
  if num_shards < 1:
    raise DataError(f'num_shards must be >= 1, got {num_shards}')
  for name, a in arrays.items():
    if a.num_examples == 0:
      raise DataError(f'{builder}/{config_name}:{name} has no examples')
    if a.num_examples < num_shards:
      raise DataError(
        f'{builder}/{config_name}:{name} has {a.num_examples} examples, fewer than the '
        f'{num_shards} shards asked for; lower num_shards.'
      )
    shard_bytes = a.num_examples // num_shards * int(np.prod(image_shape))
    if shard_bytes > SHARD_BYTES_WARNING:
      logging.warning(
        '%s/%s:%s: %.1f GB of images per shard; the writer holds one shard in memory. '
        'Use more shards (num_shards) if memory is short.',
        builder,
        config_name,
        name,
        shard_bytes / 2**30,
      )
  tfds.disable_progress_bar()
  config = tfds.core.BuilderConfig(
    name=config_name, version=VERSION, description=description or config_name
  )
  b = BUILDERS[builder](
    arrays=arrays,
    image_shape=image_shape,
    num_classes=num_classes,
    class_names=class_names,
    num_shards=num_shards,
    build_spec=build_spec,
    config=config,
    data_dir=os.fspath(data_dir),
    file_format='array_record',
  )
  # Nothing is downloaded; a throwaway download_dir keeps TFDS's empty folders out of data_dir.
  Path(data_dir).mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=data_dir, prefix='.tfds-downloads-') as downloads:
    b.download_and_prepare(
      download_dir=downloads,
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  return Path(b.data_path)
