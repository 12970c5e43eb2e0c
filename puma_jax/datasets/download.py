"""Checksummed, resumable HTTP downloads of the dataset files (CIFAR archives, generated .npz).

`fetch(url, dest, sha256=...)` streams the file in chunks into `<dest>.part`
(never holding it in memory, whatever its size), resumes a cut transfer with an
HTTP Range request (also one cut in an earlier process: the `.part` file stays),
checks the sha256 and only then renames the `.part` file onto `dest`, so a
reader sees either no file or the complete, verified one. A file that fails its
checksum is deleted. Every error is a `DataError` naming the URL, the file, and
how to place the file by hand.

The caller decides who downloads: the prepare stage runs on process 0 only, the
other processes wait at its barrier.
"""

import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from absl import logging

from puma_jax import progress
from puma_jax.datasets.errors import DataError

PART_SUFFIX = '.part'
CHUNK_BYTES = 1 << 20
_MIB = 1 << 20
# A cut transfer is resumed this many times in one call before giving up (the
# .part file stays, so the next run resumes again).
RETRIES = 5
_TRANSIENT = (
  http.client.IncompleteRead,
  http.client.RemoteDisconnected,
  ConnectionError,
  socket.timeout,
  TimeoutError,
)


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = CHUNK_BYTES) -> str:
  """Hex sha256 of a file, read in chunks."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(chunk_bytes):
      h.update(chunk)
  return h.hexdigest()


def part_path(dest: str | os.PathLike) -> Path:
  """Where an unfinished download of `dest` is kept (resumed by the next call)."""
  dest = Path(dest)
  return dest.with_name(dest.name + PART_SUFFIX)


def fetch(
  url: str,
  dest: str | os.PathLike,
  *,
  sha256: str,
  size: int | None = None,
  by_hand: str = '',
  chunk_bytes: int = CHUNK_BYTES,
  timeout_s: float = 60.0,
  retries: int = RETRIES,
  log_fn: Callable[[str], None] | None = None,
) -> Path:
  """Downloads `url` to `dest` unless a file with the right sha256 is already there.

  Args:
    url: http(s) URL of the file.
    dest: final path; the folder is created.
    sha256: expected hex digest of the whole file.
    size: expected size in bytes, if known (checked before hashing; sizes the ETA).
    by_hand: how to place the file by hand (appended to errors; default: the
      file, its sha256 and the URL).
    chunk_bytes: bytes read and written per step (memory use is about this much).
    timeout_s: socket timeout of each connection.
    retries: resumptions of a cut transfer within this call.
    log_fn: where progress lines go (default: absl logging on process 0).

  Returns:
    `dest`, complete and verified.

  Raises:
    DataError: unreachable server, HTTP error, transfer cut more than `retries`
      times (the .part file is kept for the next call), or wrong size/sha256
      (the downloaded file is deleted).
  """
  dest = Path(dest)
  sha256 = sha256.lower()
  hint = by_hand or (
    f'Or download {url} by hand (sha256 {sha256}) and place it at {dest}; nothing is then '
    'downloaded.'
  )
  if dest.exists():
    got = sha256_file(dest, chunk_bytes=chunk_bytes)
    if got != sha256:
      raise DataError(
        f'{dest}: sha256 {got}, expected {sha256} (the file of {url}). Delete it to download '
        f'it again, or replace it with the right file.'
      )
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = part_path(dest)
  logging.info('downloading %s to %s', url, dest)
  t0 = time.perf_counter()
  attempt = 0
  while True:
    try:
      total = _transfer(url, part, size, chunk_bytes, timeout_s, log_fn)
      break
    except _TRANSIENT as e:
      attempt += 1
      have = part.stat().st_size if part.exists() else 0
      if attempt > retries:
        raise DataError(
          f'downloading {url}: the connection was cut {attempt} times ({e!r}); {have} bytes '
          f'are kept in {part} and the next run resumes from there. {hint}'
        ) from e
      logging.warning('download of %s cut at %d bytes (%r); resuming', url, have, e)
    except urllib.error.HTTPError as e:
      raise DataError(f'cannot download {url}: HTTP {e.code} {e.reason}. {hint}') from e
    except (urllib.error.URLError, OSError) as e:
      reason = getattr(e, 'reason', e)
      raise DataError(f'cannot download {url}: {reason}. {hint}') from e
  got_size = part.stat().st_size
  expected_size = size if size is not None else total
  if expected_size is not None and got_size != expected_size:
    part.unlink()
    raise DataError(
      f'downloaded {url}: {got_size} bytes, expected {expected_size}; the file was deleted. {hint}'
    )
  got = sha256_file(part, chunk_bytes=chunk_bytes)
  if got != sha256:
    part.unlink()
    raise DataError(
      f'downloaded {url}: sha256 {got}, expected {sha256}; the file was deleted (a wrong '
      f'URL or checksum in the config, or a file changed on the server). {hint}'
    )
  os.replace(part, dest)
  logging.info('downloaded %s (%d bytes) in %.1fs', dest, got_size, time.perf_counter() - t0)
  return dest


def _transfer(
  url: str,
  part: Path,
  size: int | None,
  chunk_bytes: int,
  timeout_s: float,
  log_fn: Callable[[str], None] | None,
) -> int | None:
  """Appends the rest of `url` to `part`; returns the total size the server announced."""
  have = part.stat().st_size if part.exists() else 0
  if size is not None and have == size:
    return size  # Complete already; the caller verifies it.
  if size is not None and have > size:
    part.unlink()  # Not a prefix of the file we want.
    have = 0
  request = urllib.request.Request(url, headers={'User-Agent': 'puma_jax'})
  if have:
    request.add_header('Range', f'bytes={have}-')
  try:
    response = urllib.request.urlopen(request, timeout=timeout_s)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # Nothing after `have`: the .part file is complete (or wrong).
      return None
    raise
  with response:
    if have and response.status != 206:
      logging.warning('%s: the server ignored the Range request; downloading from the start', url)
      have = 0
    length = response.headers.get('Content-Length')
    total = have + int(length) if length is not None else size
    meter = progress.Progress(
      f'download {part.name[: -len(PART_SUFFIX)]}',
      None if total is None else total // _MIB,
      unit='MiB',
      initial=have // _MIB,
      log_fn=log_fn,
    )
    pending = have % _MIB
    with open(part, 'ab' if have else 'wb') as f:
      while chunk := response.read(chunk_bytes):
        f.write(chunk)
        pending += len(chunk)
        if pending >= _MIB:
          meter.update(pending // _MIB)
          pending %= _MIB
      f.flush()
      os.fsync(f.fileno())
    if total is not None and part.stat().st_size < total:
      # Some servers end the body early without an error; treat it as a cut.
      raise http.client.IncompleteRead(b'', total - part.stat().st_size)
    meter.close()
  return total
