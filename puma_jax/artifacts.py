"""What the library writes to disk, and the checks that make it safe to read back.

One small layer under every stage, sidecar, pruning result, metric file and
evaluation result:

- Atomic writes: `atomic_path` (a temporary file beside the target, fsync,
  `os.replace`), and `write_bytes` / `write_text` / `write_json` / `write_csv` /
  `save_npy` on top. A reader sees the old file or the complete new one, never a part.
- Canonical JSON: `canonical(obj)` (a JSON round trip with sorted keys, so
  tuples, lists, ConfigDicts and dicts compare equal) and `dumps`.
- Fingerprints and checksums: `fingerprint(obj)` of JSON settings (16 hex
  digits), `tree_fingerprint(tree)` of a pytree of arrays ('sha256:<hex>' over
  key paths, dtypes, shapes and bytes), `sha256_file` / `sha256_bytes` of
  content.
- "Made with other settings": `differences(saved, expected)` lists what differs
  and `check_same(saved, expected, what=..., fix=...)` raises one message
  naming each difference and the fix.
- `load_config(workdir)`: the config a workdir was made with (its `config.json`
  merged over the current schema).

Nothing here knows JAX devices, Orbax, grain or TFDS.
"""

import concurrent.futures
import contextlib
import csv
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Temporary files are named `.<stem>.tmp-<pid>-<8 hex><suffix>` beside their target.
TMP_MARKER = '.tmp-'
CONFIG_FILE = 'config.json'


class ConfigMismatchError(RuntimeError):
  """An artifact on disk was made with settings other than the ones given now."""


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds.

  The caller writes the temporary file (and should fsync it; the helpers below
  do). The temporary name keeps the final suffix (`.npy`, `.npz`) so writers
  that append one (`np.save`) do not rename it. On an exception the temporary
  file is removed and `path` is untouched. The file is made readable by all
  (0644), like files written with `open`.

  Args:
    path: the final file; its folder is created if missing.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.stem}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}')
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  """Atomically writes `data` to `path` (temp file, fsync, rename); returns `path`."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
  """Atomically writes UTF-8 `text` to `path`."""
  return write_bytes(path, text.encode('utf-8'))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
  """Atomically writes `obj` as indented, key-sorted JSON (tuples, arrays, ConfigDicts allowed)."""
  return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + '\n')


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
  """Atomically writes `rows` as CSV with a header; the columns are the first row's keys."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  return write_text(path, buf.getvalue())


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
  """Atomically writes one array as .npy (no pickles)."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      np.save(f, array, allow_pickle=False)
      f.flush()
      os.fsync(f.fileno())
  return Path(path)


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in `path` (UTF-8)."""
  return json.loads(Path(path).read_text(encoding='utf-8'))


# ----------------------------------------------------------------------------- canonical JSON


def _json_default(obj: Any) -> Any:
  if isinstance(obj, tuple | set):
    return list(obj)
  if hasattr(obj, 'tolist'):
    return obj.tolist()
  if hasattr(obj, 'to_dict'):
    return obj.to_dict()
  raise TypeError(f'not JSON serialisable: {type(obj).__name__}')


def dumps(obj: Any) -> str:
  """Compact JSON with sorted keys: the text fingerprints are taken of."""
  return json.dumps(obj, sort_keys=True, default=_json_default)


def canonical(obj: Any) -> Any:
  """A JSON round trip, so tuples and lists (and ConfigDicts and dicts) compare equal.

  Raises:
    TypeError: a value that is not JSON-serialisable (numbers, strings, lists, dicts).
  """
  return json.loads(dumps(obj))


# ----------------------------------------------------------------------------- fingerprints


def fingerprint(obj: Any) -> str:
  """16 hex digits of sha256 over the canonical JSON of `obj` (settings, configs)."""
  return sha256_bytes(dumps(canonical(obj)).encode())[:16]


def sha256_bytes(data: bytes | memoryview) -> str:
  """The hex sha256 of `data`."""
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
  """The hex sha256 of a file's content (read in 4 MiB chunks)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      h.update(chunk)
  return h.hexdigest()


def tree_fingerprint(tree: Any, *, domain: str = 'puma_jax.model_fingerprint.v1') -> str:
  """'sha256:<hex>' over a pytree's leaves: key paths, dtypes, shapes and bytes.

  Stable across processes, devices and runs; any change of a value, a key, a
  dtype or a shape changes it. Leaves are visited in the order of their key
  paths. JAX arrays must be readable on this process (fully addressable or
  fully replicated).

  Args:
    tree: a pytree of arrays (NumPy, JAX) and Python scalars.
    domain: a prefix that keeps fingerprints of different kinds apart.

  Raises:
    ValueError: a JAX array sharded across processes (naming its key path).
  """
  import jax  # noqa: PLC0415 (only this function needs pytrees)

  h = hashlib.sha256(domain.encode() + b'\0')
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    name = jax.tree_util.keystr(path)
    arr = to_host(leaf, name)
    if arr.dtype.byteorder == '>':
      arr = arr.astype(arr.dtype.newbyteorder('<'))
    header = json.dumps({'name': name, 'dtype': arr.dtype.name, 'shape': list(arr.shape)})
    h.update(len(header).to_bytes(8, 'little'))
    h.update(header.encode())
    h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
  return 'sha256:' + h.hexdigest()


def tree_checksums(tree: Any) -> dict[str, str | None]:
  """A content checksum per leaf: key path -> sha256 hex over dtype, shape and bytes.

  Leaves are hashed in parallel threads (hashlib releases the GIL). Leaves that
  this process cannot read whole (JAX arrays sharded across processes) get
  None: they are not verified. `damaged_leaves` names the leaves that differ.
  """
  import jax  # noqa: PLC0415 (only this function needs pytrees)

  def checksum(item: tuple[Any, Any]) -> tuple[str, str | None]:
    path, leaf = item
    name = jax.tree_util.keystr(path)
    try:
      arr = to_host(leaf, name)
    except ValueError:
      return name, None
    if arr.dtype.byteorder == '>':
      arr = arr.astype(arr.dtype.newbyteorder('<'))
    h = hashlib.sha256(f'{arr.dtype.name}{list(arr.shape)}'.encode())
    h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    return name, h.hexdigest()

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return dict(pool.map(checksum, leaves))


def damaged_leaves(
  recorded: Mapping[str, str | None], actual: Mapping[str, str | None]
) -> list[str]:
  """Key paths whose checksum differs between `recorded` and `actual` (None: not verified)."""
  names = sorted(set(recorded) | set(actual))
  return [
    n
    for n in names
    if recorded.get(n, '') is not None
    and actual.get(n, '') is not None
    and recorded.get(n) != actual.get(n)
  ]


def to_host(leaf: Any, name: str = 'leaf') -> np.ndarray:
  """`np.asarray(leaf)`, refusing JAX arrays whose data other processes hold."""
  if (
    hasattr(leaf, 'is_fully_addressable')
    and not leaf.is_fully_addressable
    and not leaf.is_fully_replicated
  ):
    raise ValueError(
      f'{name} is sharded across processes; replicate it (e.g. parallel.replicate) to read it '
      'on one process'
    )
  return np.asarray(leaf)


# ----------------------------------------------------------------------------- settings checks


def differences(saved: Any, expected: Any, prefix: str = '') -> list[str]:
  """Human-readable differences between two JSON values: 'key.sub: saved -> expected'."""
  if isinstance(saved, dict) and isinstance(expected, dict):
    out = []
    for key in sorted(set(saved) | set(expected)):
      name = f'{prefix}.{key}' if prefix else str(key)
      if key not in saved:
        out.append(f'{name}: (absent) -> {expected[key]!r}')
      elif key not in expected:
        out.append(f'{name}: {saved[key]!r} -> (absent)')
      else:
        out.extend(differences(saved[key], expected[key], name))
    return out
  return [] if saved == expected else [f'{prefix or "value"}: {saved!r} -> {expected!r}']


def mismatch_message(what: str, diffs: list[str], fix: str) -> str:
  """'<what> was made with other settings (saved -> now):\n  d1\n  d2\n<fix>'."""
  return (
    f'{what} was made with other settings (saved -> now):\n  '
    + '\n  '.join(diffs or ['(unknown difference)'])
    + f'\n{fix}'
  )


def check_same(
  saved: Any,
  expected: Any,
  *,
  what: str,
  fix: str,
  error: type[Exception] = ConfigMismatchError,
) -> None:
  """Raises `error` naming every difference unless `saved` equals `expected` (canonical JSON).

  Args:
    saved: the settings recorded with an artifact.
    expected: the settings it must have been made with.
    what: the artifact, e.g. "stage 'prune' in /w/prune" (starts the message).
    fix: what the user can do, e.g. 'Use a new --workdir, or ...'.
    error: the exception class to raise.
  """
  saved, expected = canonical(saved), canonical(expected)
  if saved != expected:
    raise error(mismatch_message(what, differences(saved, expected), fix))


# ----------------------------------------------------------------------------- workdir config


def write_config(workdir: str | os.PathLike, config: Any) -> Path:
  """Writes `<workdir>/config.json` (a ConfigDict or a dict) atomically."""
  data = (
    json.loads(config.to_json_best_effort()) if hasattr(config, 'to_json_best_effort') else config
  )
  return write_json(Path(workdir) / CONFIG_FILE, data)


def load_config(workdir: str | os.PathLike, base: Any = None) -> tuple[Any, list[str]]:
  """The config a workdir was made with: its `config.json` merged over `base`.

  Args:
    workdir: a pipeline workdir.
    base: the current schema (default: `config_base.get_base_config()`); fields
      saved in config.json replace its values.

  Returns:
    (config, ignored): the merged ConfigDict (the model's own fields, such as
    `model.depth` or `model.conv_channels`, taken as saved, lists as tuples), and
    the dotted names of other saved fields that the current schema does not have.

  Raises:
    FileNotFoundError: the workdir has no config.json (naming it).
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
      f'{path} is missing: give the workdir of a pipeline run '
      '(python -m puma_jax.main --config=configs/default.py --workdir=...)'
    )
  if base is None:
    from puma_jax import config_base  # noqa: PLC0415 (avoids an import cycle)

    base = config_base.get_base_config()
  ignored = _merge(base, read_json(path), '')
  return base, ignored


def _tuples(value: Any) -> Any:
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _merge(config: Any, saved: Mapping[str, Any], prefix: str) -> list[str]:
  ignored = []
  for key, value in saved.items():
    if key not in config:
      if prefix == 'model.':  # Each model has its own fields (configs add them).
        config[key] = _tuples(value)
      else:
        ignored.append(prefix + key)
    elif isinstance(value, dict):
      ignored += _merge(config[key], value, f'{prefix}{key}.')
    else:
      config[key] = float(value) if isinstance(config[key], float) else _tuples(value)
  return ignored
