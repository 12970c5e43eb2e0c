"""Stage bookkeeping for the resumable pipeline: completion markers and config checks.

Every stage of the main job writes `WORKDIR/<stage>/stage.json` when, and only
when, its output is complete. The marker records the config fields the stage
depends on and a fingerprint chaining those fields with the fingerprints of
the stages it reads from. A rerun skips a stage whose marker matches, and
refuses, with a message saying how to proceed, one whose marker disagrees, so
results made with different settings are never mixed.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MARKER = 'stage.json'


class ConfigMismatchError(RuntimeError):
  """A workdir holds a stage made with different settings."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` through a temp file in the same folder and a rename."""
  atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` through a temp file in the same folder and a rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(Path(path).read_text(encoding='utf-8'))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + '\n')


def _json_default(obj: Any) -> Any:
  if isinstance(obj, tuple | set):
    return list(obj)
  if hasattr(obj, 'tolist'):
    return obj.tolist()
  if hasattr(obj, 'to_dict'):
    return obj.to_dict()
  raise TypeError(f'not JSON serialisable: {type(obj).__name__}')


def canonical(obj: Any) -> Any:
  """A JSON round trip, so tuples and lists (and ConfigDicts and dicts) compare equal."""
  return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def select_fields(config: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
  """The config sub-tree of each dotted field name (`'data'`, `'train.batch_size'`)."""
  config = canonical(config)
  out = {}
  for field in fields:
    node = config
    for part in field.split('.'):
      node = node[part]
    out[field] = node
  return out


def fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(canonical(obj), sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = '') -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      name = f'{prefix}.{key}' if prefix else key
      if key not in old:
        out.append(f'{name}: (absent) -> {new[key]!r}')
      elif key not in new:
        out.append(f'{name}: {old[key]!r} -> (absent)')
      else:
        out.extend(_differences(old[key], new[key], name))
    return out
  return [] if old == new else [f'{prefix}: {old!r} -> {new!r}']


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: its name and the config fields its output depends on."""

  name: str
  fields: tuple[str, ...]

  def directory(self, workdir: str | os.PathLike) -> Path:
    return Path(workdir) / self.name

  def expected(self, config: Mapping[str, Any], upstream: Mapping[str, str]) -> dict[str, Any]:
    """The marker this stage would write for `config` and the upstream fingerprints."""
    fields = select_fields(config, self.fields)
    return {
      'stage': self.name,
      'fields': fields,
      'upstream': dict(sorted(upstream.items())),
      'fingerprint': fingerprint({'fields': fields, 'upstream': upstream}),
    }

  def read_marker(self, workdir: str | os.PathLike) -> dict[str, Any] | None:
    path = self.directory(workdir) / MARKER
    if not path.exists():
      return None
    try:
      return json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
      raise ConfigMismatchError(
        f'{path} is not valid JSON ({e}); delete {self.directory(workdir)} to recompute '
        f'stage {self.name!r}.'
      ) from e

  def is_complete(
    self, workdir: str | os.PathLike, config: Mapping[str, Any], upstream: Mapping[str, str]
  ) -> bool:
    """True when the stage's marker matches; raises ConfigMismatchError when it disagrees."""
    marker = self.read_marker(workdir)
    if marker is None:
      return False
    expected = self.expected(config, upstream)
    if marker.get('fingerprint') == expected['fingerprint']:
      return True
    diffs = _differences(marker.get('fields', {}), expected['fields'])
    if not diffs:
      diffs = [
        f'its inputs changed: {d}' for d in _differences(marker.get('upstream', {}), upstream)
      ]
    raise ConfigMismatchError(
      f'stage {self.name!r} in {self.directory(workdir)} was made with different settings:\n  '
      + '\n  '.join(diffs or ['(unknown difference)'])
      + f'\nTo proceed: use a new --workdir, or rerun with the settings it was made with, or '
      f'delete {self.directory(workdir)} (and the stages after it) to recompute it.'
    )

  def mark_complete(
    self,
    workdir: str | os.PathLike,
    config: Mapping[str, Any],
    upstream: Mapping[str, str],
    outputs: Mapping[str, Any] | None = None,
  ) -> str:
    """Writes the marker atomically; returns the stage's fingerprint."""
    marker = self.expected(config, upstream)
    marker['finished'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
    marker['outputs'] = dict(outputs or {})
    atomic_write_json(self.directory(workdir) / MARKER, marker)
    return marker['fingerprint']
