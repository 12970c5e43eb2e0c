"""Tiny built datasets for tests (of this package and of the stages that read data).

`make_split(data_dir, ...)` builds a real TFDS array_record dataset in a second
or so, whose images encode their own global index, so a test can check which
example it received: pixel [0, 0, 0] is `index % 256` and pixel [0, 1, 0] is
`index // 256`; labels are `index % num_classes` unless given.
"""

import os

import numpy as np

from puma_jax.datasets import builders, splits


def index_images(num_examples: int, image_shape: tuple[int, int, int]) -> np.ndarray:
  """u8[N,H,W,C] images whose pixels (0,0,0) and (0,1,0) spell their index (H, W >= 2)."""
  rng = np.random.default_rng(num_examples)
  images = rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8)
  ids = np.arange(num_examples)
  images[:, 0, 0, 0] = ids % 256
  images[:, 0, 1, 0] = ids // 256
  return images


def decode_index(images: np.ndarray) -> np.ndarray:
  """i64[n]: the indices spelled by `index_images` (images as u8 or as f32 in [0, 1])."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = np.rint(images * 255.0).astype(np.int64)
  return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def make_split(
  data_dir: str | os.PathLike,
  *,
  num_examples: int,
  image_shape: tuple[int, int, int] = (4, 4, 1),
  num_classes: int = 10,
  num_shards: int = 2,
  source: str = 'real',
  name: str | None = None,
  labels: np.ndarray | None = None,
) -> splits.Split:
  """Builds (or reopens) a tiny dataset with one 'train' split and returns it.

  Args:
    data_dir: TFDS data_dir.
    num_examples: examples in the split.
    image_shape: (H, W, C), H and W at least 2.
    num_classes: number of classes.
    num_shards: shards of the split.
    source: 'real' (builder puma_real, source 0) or 'generated' (puma_generated, 1).
    name: config name (default derived from the arguments).
    labels: i64[N] labels (default index % num_classes).
  """
  builder = {'real': 'puma_real', 'generated': 'puma_generated'}[source]
  name = name or f'test_{source}_{num_examples}_{num_shards}'
  ddir = builders.dataset_dir(data_dir, builder, name)
  if not (ddir / 'dataset_info.json').exists():
    images = index_images(num_examples, image_shape)
    if labels is None:
      labels = np.arange(num_examples) % num_classes
    arrays = {
      'train': builders.ArraySplit(
        labels=np.asarray(labels, np.int64), read_images=lambda a, b: images[a:b]
      )
    }
    builders.build(
      builder,
      name,
      data_dir=data_dir,
      arrays=arrays,
      image_shape=image_shape,
      num_classes=num_classes,
      num_shards=num_shards,
      build_spec={'kind': 'test'},
    )
  return splits.open_split(ddir, 'train', source_id=splits.SOURCE_IDS[source], data_dir=data_dir)
