"""Streaming reads of arrays inside an .npz, in bounded memory.

The generated-data files of Wang et al. 2023 (DM-Improves-AT) are .npz archives
with an `image` array (u8[N,H,W,C]) and a `label` array (int[N]); the 50M file is
about 150 GB, so it is never loaded whole. An .npz is a zip of .npy members:
each member is opened as a zip stream, its .npy header is parsed with
`numpy.lib.format`, and rows are read in order, a chunk at a time. This works for
`np.savez` (stored members: skipping ahead is a seek) and `np.savez_compressed`
(deflated members: read sequentially).
"""

import dataclasses
import os
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from puma_jax.datasets.errors import DataError

CHUNK_BYTES = 64 << 20  # Rows are read in chunks of about this size.


@dataclasses.dataclass(frozen=True)
class Member:
  """One array of an .npz, described by its .npy header (nothing is loaded).

  Attributes:
    key: the array's name in the archive ('image' for member 'image.npy').
    dtype: its dtype.
    shape: its shape.
    fortran_order: whether it is stored column-major (not streamable by rows).
    header_size: bytes before the first element inside the member.
    crc: the zip CRC-32 of the member (a cheap content fingerprint).
    stored_size: bytes of the member in the archive (compressed size).
    compressed: whether the member is deflated.
  """

  key: str
  dtype: np.dtype
  shape: tuple[int, ...]
  fortran_order: bool
  header_size: int
  crc: int
  stored_size: int
  compressed: bool

  @property
  def row_bytes(self) -> int:
    return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def _open_zip(path: Path) -> zipfile.ZipFile:
  if not path.exists():
    raise DataError(f'{path}: no such file')
  if path.stat().st_size == 0:
    raise DataError(f'{path}: the file is empty (0 bytes); expected an .npz archive')
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise DataError(
      f'{path}: not a readable .npz (zip) archive ({e}); the file is truncated or corrupt, '
      'or not an .npz at all. Copy it again or re-save it with np.savez.'
    ) from e


def _read_header(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
  key = info.filename[: -len('.npy')]
  try:
    with zf.open(info) as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
      elif version in ((2, 0), (3, 0)):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise ValueError(f'unsupported .npy format version {version}')
      header_size = f.tell()
  except (ValueError, EOFError, zipfile.BadZipFile, zlib.error, OSError) as e:
    raise DataError(f'{path}: member {info.filename!r} has no valid .npy header ({e})') from e
  return Member(
    key=key,
    dtype=np.dtype(dtype),
    shape=tuple(int(s) for s in shape),
    fortran_order=bool(fortran_order),
    header_size=header_size,
    crc=info.CRC,
    stored_size=info.compress_size,
    compressed=info.compress_type != zipfile.ZIP_STORED,
  )


def inspect(path: str | os.PathLike) -> dict[str, Member]:
  """Describes every array of an .npz from its headers, without reading the data.

  Raises:
    DataError: the file is missing, empty, not a zip, or a member is not a .npy.
  """
  path = Path(path)
  with _open_zip(path) as zf:
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if not infos:
      raise DataError(f'{path}: the archive holds no arrays')
    members = {}
    for info in infos:
      if not info.filename.endswith('.npy'):
        raise DataError(f'{path}: member {info.filename!r} is not a .npy array')
      m = _read_header(path, zf, info)
      members[m.key] = m
  return members


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
  """Content identity of an .npz from its zip directory: each member's CRC-32, size, shape.

  Cheap for any size (no data is read): zip stores a CRC-32 of every member.
  """
  members = inspect(path)
  return {
    k: {'crc32': m.crc, 'dtype': m.dtype.str, 'shape': list(m.shape)}
    for k, m in sorted(members.items())
  }


class ArrayStream:
  """Reads rows of one array of an .npz in order, never holding more than a chunk.

  Reading forward is sequential (a seek for stored members); asking for an
  earlier row reopens the member. Use as a context manager.

  Example:
    with ArrayStream(path, 'image') as s:
      for start, rows in s.chunks(0, s.num_rows):
        ...
  """

  def __init__(self, path: str | os.PathLike, key: str, *, chunk_bytes: int = CHUNK_BYTES):
    self.path = Path(path)
    self.key = key
    members = inspect(self.path)
    if key not in members:
      raise DataError(f'{self.path}: no array {key!r}; the archive holds {sorted(members)}')
    self.member = members[key]
    if self.member.fortran_order:
      raise DataError(
        f'{self.path}: array {key!r} is stored in Fortran order and cannot be streamed by rows; '
        're-save it C-contiguous (np.ascontiguousarray) with np.savez.'
      )
    if self.member.dtype.hasobject:
      raise DataError(f'{self.path}: array {key!r} has dtype object; expected numbers')
    if not self.member.shape:
      raise DataError(f'{self.path}: array {key!r} is a scalar; expected one row per example')
    self.num_rows = self.member.shape[0]
    self.row_shape = self.member.shape[1:]
    self.chunk_rows = max(1, chunk_bytes // max(1, self.member.row_bytes))
    self._zip: zipfile.ZipFile | None = None
    self._file = None
    self._row = 0

  def _reopen(self) -> None:
    self._close_member()
    if self._zip is None:
      self._zip = _open_zip(self.path)
    self._file = self._zip.open(f'{self.key}.npy')
    self._file.seek(self.member.header_size)
    self._row = 0

  def _close_member(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def close(self) -> None:
    self._close_member()
    if self._zip is not None:
      self._zip.close()
      self._zip = None

  def __enter__(self) -> 'ArrayStream':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def read(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as an array of shape (stop - start, *row_shape).

    Raises:
      DataError: the member ends early (truncated file) or fails its CRC check.
    """
    if not 0 <= start <= stop <= self.num_rows:
      raise IndexError(f'rows [{start}, {stop}) out of range for {self.num_rows} rows')
    if self._file is None or start < self._row:
      self._reopen()
    row_bytes = self.member.row_bytes
    try:
      if start > self._row:
        self._file.seek(self.member.header_size + start * row_bytes)
        self._row = start
      n_bytes = (stop - start) * row_bytes
      buf = bytearray(n_bytes)
      view = memoryview(buf)
      got = 0
      while got < n_bytes:
        n = self._file.readinto(view[got:])
        if not n:
          break
        got += n
    except (EOFError, zipfile.BadZipFile, zlib.error, OSError) as e:
      raise DataError(
        f'{self.path}: reading array {self.key!r} rows [{start}, {stop}) failed ({e}); '
        'the file is truncated or corrupt. Copy it again.'
      ) from e
    if got != n_bytes:
      raise DataError(
        f'{self.path}: array {self.key!r} ends at byte {got} of the {n_bytes} needed for rows '
        f'[{start}, {stop}); the file is truncated. Copy it again.'
      )
    self._row = stop
    return np.frombuffer(buf, dtype=self.member.dtype).reshape((stop - start, *self.row_shape))

  def chunks(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (first row, rows) chunks covering [start, stop) in order."""
    for a in range(start, stop, self.chunk_rows):
      b = min(stop, a + self.chunk_rows)
      yield a, self.read(a, b)
