"""Atomic file writes: a temporary file in the same directory, then `os.replace`.

A reader sees either the old file or the complete new one, never a partial
write, even if the writer is killed.
"""

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TMP_MARKER = '.tmp-'


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds.

  The temporary name keeps the final suffix (e.g. `.npy`, `.npz`) so that
  writers that append one (`np.save`) do not rename it.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.stem}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}')
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
  """Atomically writes one array as .npy."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      np.save(f, array, allow_pickle=False)
      f.flush()
      os.fsync(f.fileno())
  return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
  """Atomically writes `obj` as indented, key-sorted JSON."""
  with atomic_path(path) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
  return Path(path)
