"""What each dataset is built from: validated, in-order rows for the builders.

A `Source` bundles the rows of each split (`builders.ArraySplit`) with the image
shape, classes and a `spec`: the JSON-able identity of what was read (kind,
file fingerprint, generator settings, shard count) that `prepare` stores in the
dataset's metadata and compares before reusing a built dataset.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from puma_jax.datasets import builders, cifar, generator, mnist, npz
from puma_jax.datasets.errors import DataError

# Spec keys that describe but do not identify a source (ignored when comparing).
INFO_KEYS = ('path', 'url')


@dataclasses.dataclass
class Source:
  arrays: dict[str, builders.ArraySplit]
  image_shape: tuple[int, int, int]
  num_classes: int
  class_names: tuple[str, ...] | None
  spec: dict[str, Any]
  cleanup: Callable[[], None] | None = None  # Called once the dataset is written.


def mnist_spec() -> dict[str, Any]:
  return {'kind': 'mnist_embedded', 'file_sha256': mnist.file_sha256()}


def mnist_source() -> Source:
  arrays = {}
  for split in ('train', 'test'):
    images, labels, rows = mnist.split_arrays(split)
    arrays[split] = builders.ArraySplit(
      labels=labels, read_images=lambda a, b, x=images: x[a:b], source_index=rows
    )
  return Source(arrays, mnist.IMAGE_SHAPE, mnist.NUM_CLASSES, mnist.CLASS_NAMES, mnist_spec())


def cifar_spec(kind: str) -> dict[str, Any]:
  return {'kind': kind, 'archive_sha256': cifar.expected_checksum(kind)[1]}


def cifar_source(kind: str, archive_dir: str | os.PathLike, *, download: bool = False) -> Source:
  """The CIFAR archive in `archive_dir` (downloaded first if missing and `download`)."""
  path = cifar.ensure_archive(kind, archive_dir, download_missing=download)
  logging.info('reading %s', path)
  data = cifar.read_archive(kind, path)
  arrays = {
    split: builders.ArraySplit(
      labels=data[split][1], read_images=lambda a, b, x=data[split][0]: x[a:b]
    )
    for split in ('train', 'test')
  }
  return Source(
    arrays,
    cifar.IMAGE_SHAPE,
    cifar.ARCHIVES[kind].num_classes,
    data['class_names'],
    cifar_spec(kind),
  )


def npz_spec(path: str | os.PathLike) -> dict[str, Any]:
  return {'kind': 'npz', 'path': os.fspath(Path(path).resolve()), 'arrays': npz.fingerprint(path)}


def npz_url_spec(url: str, sha256: str, path: str | os.PathLike) -> dict[str, Any]:
  """A downloaded .npz is identified by its sha256 (the URL and path only describe it)."""
  return {'kind': 'npz_url', 'sha256': sha256, 'url': url, 'path': os.fspath(Path(path).resolve())}


def npz_source(
  path: str | os.PathLike,
  *,
  num_classes: int,
  image_shape: tuple[int, int, int] | None = None,
  spec: dict[str, Any] | None = None,
) -> Source:
  """A generated-data .npz in the DM-Improves-AT format, validated, streamed in chunks.

  The file must hold `image` (uint8, N x H x W x C, or N x H x W for one channel)
  and `label` (integers in [0, num_classes), shape N). Labels are read (in chunks)
  and checked before anything is written; images are read chunk by chunk while
  the shards are written.

  Args:
    path: the .npz file.
    num_classes: classes of the real dataset it is paired with.
    image_shape: required (H, W, C), that of the real dataset.
    spec: identity stored with the dataset (default: `npz_spec(path)`).

  Raises:
    DataError: naming the file and what is wrong with it.
  """
  path = Path(path)
  members = npz.inspect(path)
  missing = [k for k in ('image', 'label') if k not in members]
  if missing:
    raise DataError(
      f'{path}: missing array(s) {missing}; found {sorted(members)}. A generated-data .npz '
      'needs `image` (uint8, N x H x W x C) and `label` (int, N), as in DM-Improves-AT: '
      'np.savez(path, image=images, label=labels).'
    )
  extra = sorted(set(members) - {'image', 'label'})
  if extra:
    logging.info('%s: ignoring arrays %s', path, extra)
  im, lb = members['image'], members['label']
  if im.dtype != np.uint8:
    raise DataError(
      f'{path}: `image` has dtype {im.dtype}; expected uint8 pixels in 0..255 '
      '(convert with np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for images in [0, 1]).'
    )
  if len(im.shape) not in (3, 4):
    raise DataError(f'{path}: `image` has shape {im.shape}; expected N x H x W x C (or N x H x W)')
  if not (np.issubdtype(lb.dtype, np.integer) and not np.issubdtype(lb.dtype, np.bool_)):
    raise DataError(f'{path}: `label` has dtype {lb.dtype}; expected integers (class ids)')
  if len(lb.shape) != 1:
    raise DataError(f'{path}: `label` has shape {lb.shape}; expected one label per image (N,)')
  n = im.shape[0]
  if lb.shape[0] != n:
    raise DataError(f'{path}: {n} images but {lb.shape[0]} labels')
  if n == 0:
    raise DataError(f'{path}: the file holds no examples (N = 0)')
  shape = tuple(im.shape[1:]) if len(im.shape) == 4 else (*im.shape[1:], 1)
  if image_shape is not None and shape != tuple(image_shape):
    raise DataError(
      f'{path}: images are {shape} (H, W, C) but the real dataset has {tuple(image_shape)}; '
      'generated and real images must have the same shape.'
    )
  labels = np.empty(n, np.int64)
  with npz.ArrayStream(path, 'label') as s:
    for a, chunk in s.chunks(0, n):
      labels[a : a + len(chunk)] = chunk
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if len(bad):
    raise DataError(
      f'{path}: {len(bad)} labels outside [0, {num_classes}) (first: label {labels[bad[0]]} at '
      f'row {bad[0]}); the real dataset has {num_classes} classes.'
    )
  stream = npz.ArrayStream(path, 'image')

  def read_images(a: int, b: int) -> np.ndarray:
    x = stream.read(a, b)
    if b == n:
      stream.close()
    return x.reshape((b - a, *shape))

  spec = spec if spec is not None else npz_spec(path)
  arrays = {'train': builders.ArraySplit(labels, read_images)}
  return Source(arrays, shape, num_classes, None, spec, cleanup=stream.close)


def embedded_generated_spec(seed: int, num_examples: int) -> dict[str, Any]:
  return {
    'kind': 'embedded',
    'generator': generator.VERSION,
    'settings': dataclasses.asdict(generator.Settings()),
    'seed': seed,
    'num_examples': num_examples,
    'fitted_on': {'mnist_embedded:train': mnist.file_sha256()},
  }


@functools.cache
def fitted_generator() -> generator.ClassConditionalGenerator:
  """The generator fitted on the embedded MNIST train split (fitted once per process)."""
  images, labels, _ = mnist.split_arrays('train')
  return generator.ClassConditionalGenerator().fit(images, labels)


def write_embedded_generated(path: str | os.PathLike, *, seed: int, num_examples: int) -> Path:
  """Samples the generator fitted on the embedded MNIST train split; writes an .npz."""
  images, labels = fitted_generator().sample(num_examples, seed=seed)
  return generator.write_npz(path, images, labels)


def same_spec(a: dict[str, Any], b: dict[str, Any]) -> bool:
  """Equal as JSON, ignoring descriptive keys (INFO_KEYS)."""

  def norm(d):
    return json.loads(
      json.dumps({k: v for k, v in d.items() if k not in INFO_KEYS}, sort_keys=True)
    )

  return norm(a) == norm(b)
