"""CIFAR-10 / CIFAR-100 from the official binary archives, downloaded or placed by hand.

`ensure_archive` finds `cifar-10-binary.tar.gz` or `cifar-100-binary.tar.gz`
in the folder named by `data.real.archive_dir` (default: `<data_dir>/downloads`)
and, when it is missing and `data.real.download` is on, downloads it from
https://www.cs.toronto.edu/~kriz/ (resumable, see `download.py`). The archive is
checked against the size and sha256 that TFDS ships for the same URL
(`tensorflow_datasets/url_checksums/cifar10*.txt`), then read with tarfile +
numpy. Binary records: CIFAR-10 is <1 label byte><3072 pixel bytes>, CIFAR-100 is <coarse byte><fine byte><3072 bytes> (fine labels are
used); pixels are R, G, B planes of 32x32, transposed here to HWC. Train order is
the archive's (data_batch_1..5 for CIFAR-10), as in TFDS and torchvision.
"""

import dataclasses
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums

from puma_jax.datasets import download
from puma_jax.datasets.errors import DataError

IMAGE_SHAPE = (32, 32, 3)
_PIXELS = 32 * 32 * 3


@dataclasses.dataclass(frozen=True)
class Archive:
  title: str
  filename: str
  url: str
  checksums_file: str  # in tensorflow_datasets/url_checksums/
  num_classes: int
  prefix: str  # folder inside the archive
  train_files: tuple[str, ...]
  test_files: tuple[str, ...]
  label_bytes: int  # bytes before the pixels in each record
  label_offset: int  # which of those bytes is the label
  names_file: str


ARCHIVES = {
  'cifar10': Archive(
    title='CIFAR-10',
    filename='cifar-10-binary.tar.gz',
    url='https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz',
    checksums_file='cifar10.txt',
    num_classes=10,
    prefix='cifar-10-batches-bin/',
    train_files=tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
    test_files=('test_batch.bin',),
    label_bytes=1,
    label_offset=0,
    names_file='batches.meta.txt',
  ),
  'cifar100': Archive(
    title='CIFAR-100',
    filename='cifar-100-binary.tar.gz',
    url='https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz',
    checksums_file='cifar100.txt',
    num_classes=100,
    prefix='cifar-100-binary/',
    train_files=('train.bin',),
    test_files=('test.bin',),
    label_bytes=2,
    label_offset=1,
    names_file='fine_label_names.txt',
  ),
}

# Tests only: kind -> (size, sha256) used instead of the official values.
EXPECTED_OVERRIDE: dict[str, tuple[int, str]] = {}


def expected_checksum(kind: str) -> tuple[int, str]:
  """(size in bytes, sha256 hex) of the official archive, from TFDS's package files."""
  if kind in EXPECTED_OVERRIDE:
    return EXPECTED_OVERRIDE[kind]
  a = ARCHIVES[kind]
  path = Path(tfds.__file__).parent / 'url_checksums' / a.checksums_file
  info = tfds_checksums.load_url_infos(path)[a.url]
  return int(info.size), str(info.checksum)


sha256_file = download.sha256_file


def _where(kind: str, archive_dir: str, *, offer_download: bool = True) -> str:
  a = ARCHIVES[kind]
  size, sha = expected_checksum(kind)
  return (
    f'Download {a.filename} (the binary version, {size} bytes, sha256 {sha}) from {a.url} and '
    f'put it in the folder named by data.real.archive_dir (now {archive_dir!r})'
    + (', or set data.real.download=True to download it automatically.' if offer_download else '.')
  )


def ensure_archive(kind: str, archive_dir: str | os.PathLike, *, download_missing: bool) -> Path:
  """The verified archive in `archive_dir`, downloaded first if missing and allowed.

  Args:
    kind: 'cifar10' or 'cifar100'.
    archive_dir: the folder holding (or receiving) the archive.
    download_missing: download the official archive when it is not there
      (`data.real.download`); if False, a missing archive is an error.

  Raises:
    DataError: as `verify_archive`, or a failed download (naming the URL and how
      to place the file by hand).
  """
  if kind not in ARCHIVES:
    raise DataError(f'unknown CIFAR kind {kind!r}; known: {sorted(ARCHIVES)}')
  a = ARCHIVES[kind]
  if download_missing and archive_dir and not (Path(archive_dir) / a.filename).exists():
    size, sha = expected_checksum(kind)
    download.fetch(
      a.url,
      Path(archive_dir) / a.filename,
      sha256=sha,
      size=size,
      by_hand=(
        'Or place it by hand: '
        + _where(kind, os.fspath(archive_dir), offer_download=False)
        + ' Set data.real.download=False to stay offline.'
      ),
    )
  return verify_archive(kind, archive_dir)


def verify_archive(kind: str, archive_dir: str | os.PathLike) -> Path:
  """The archive's path, after checking that it exists and matches the official checksum.

  Raises:
    DataError: no archive_dir, missing file, or wrong size/sha256; the message says
      which file to download and where to put it.
  """
  if kind not in ARCHIVES:
    raise DataError(f'unknown CIFAR kind {kind!r}; known: {sorted(ARCHIVES)}')
  a = ARCHIVES[kind]
  if not archive_dir:
    raise DataError(f'data.real.kind={kind} needs data.real.archive_dir. ' + _where(kind, ''))
  path = Path(archive_dir) / a.filename
  if not path.is_file():
    raise DataError(f'{path}: {a.title} archive not found. ' + _where(kind, str(archive_dir)))
  size, sha = expected_checksum(kind)
  got_size = path.stat().st_size
  got_sha = sha256_file(path) if got_size == size else None
  if got_size != size or got_sha != sha:
    got = f'{got_size} bytes' + (f', sha256 {got_sha}' if got_sha else '')
    raise DataError(
      f'{path}: not the official {a.filename} ({got}; expected {size} bytes, sha256 {sha}). '
      'It may be incomplete, corrupt, or another version (python/matlab). '
      + _where(kind, str(archive_dir))
    )
  return path


def _parse_records(path: Path, member: str, data: bytes, a: Archive) -> tuple[np.ndarray, ...]:
  record = a.label_bytes + _PIXELS
  if not data or len(data) % record:
    raise DataError(
      f'{path}: member {member} has {len(data)} bytes, not a positive multiple of the '
      f'{record}-byte {a.title} record; the archive is corrupt or truncated.'
    )
  table = np.frombuffer(data, np.uint8).reshape(-1, record)
  labels = table[:, a.label_offset].astype(np.int64)
  if labels.max() >= a.num_classes:
    raise DataError(f'{path}: member {member} has label {labels.max()} >= {a.num_classes}')
  images = table[:, a.label_bytes :].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def read_archive(kind: str, path: str | os.PathLike) -> dict:
  """Reads a (verified) CIFAR binary archive.

  Returns:
    {'train': (images u8[N,32,32,3], labels i64[N]), 'test': (...), 'class_names': tuple[str]}

  Raises:
    DataError: an unreadable or truncated archive, or missing members.
  """
  a = ARCHIVES[kind]
  path = Path(path)
  wanted = {a.prefix + f for f in (*a.train_files, *a.test_files, a.names_file)}
  found: dict[str, bytes] = {}
  try:
    with tarfile.open(path, 'r:gz') as tar:
      for m in tar:
        if m.name in wanted and m.isfile():
          found[m.name] = tar.extractfile(m).read()
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DataError(
      f'{path}: unreadable {a.title} archive ({e}); it is truncated or corrupt.'
    ) from e
  missing = sorted(wanted - set(found))
  if missing:
    raise DataError(f'{path}: not a {a.title} binary archive; missing members {missing}')
  out = {}
  for split, files in (('train', a.train_files), ('test', a.test_files)):
    parts = [_parse_records(path, f, found[a.prefix + f], a) for f in files]
    out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  names = [n.strip() for n in found[a.prefix + a.names_file].decode().splitlines() if n.strip()]
  out['class_names'] = tuple(names) if len(names) == a.num_classes else None
  return out
