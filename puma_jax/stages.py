"""Stage bookkeeping for the resumable pipeline: completion markers and config checks.

Every stage of the main job writes `WORKDIR/<stage>/stage.json` when, and only
when, its output is complete. The marker records the config fields the stage
depends on and a fingerprint chaining those fields with the fingerprints of
the stages it reads from. A rerun skips a stage whose marker matches, and
refuses, with a message saying how to proceed, one whose marker disagrees, so
results made with different settings are never mixed.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from puma_jax import artifacts
from puma_jax.artifacts import ConfigMismatchError

__all__ = ['MARKER', 'ConfigMismatchError', 'Stage', 'select_fields']

MARKER = 'stage.json'


def select_fields(
  config: Mapping[str, Any], fields: Sequence[str], ignore: Sequence[str] = ()
) -> dict[str, Any]:
  """The config sub-tree of each dotted field name (`'data'`, `'train.batch_size'`).

  `ignore` names dotted fields inside those sub-trees that are left out (settings
  that do not change the stage's output, such as `data.real.download`).
  """
  config = artifacts.canonical(config)  # a copy: the ignored leaves are dropped from it
  for field in ignore:
    *parents, leaf = field.split('.')
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.pop(leaf, None)
  out = {}
  for field in fields:
    node = config
    for part in field.split('.'):
      node = node[part]
    out[field] = node
  return out


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: its name and the config fields its output depends on.

  `config_fields(config)` adds fields chosen by the config itself (the margin
  stage records the settings of the estimator the config names, and only those).
  """

  name: str
  fields: tuple[str, ...]
  ignore: tuple[str, ...] = ()
  config_fields: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None

  def fields_of(self, config: Mapping[str, Any]) -> tuple[str, ...]:
    """The dotted config fields this stage's output depends on, for `config`."""
    extra = self.config_fields(config) if self.config_fields is not None else ()
    return self.fields + tuple(extra)

  def directory(self, workdir: str | os.PathLike) -> Path:
    return Path(workdir) / self.name

  def expected(self, config: Mapping[str, Any], upstream: Mapping[str, str]) -> dict[str, Any]:
    """The marker this stage would write for `config` and the upstream fingerprints."""
    fields = select_fields(config, self.fields_of(config), self.ignore)
    return {
      'stage': self.name,
      'fields': fields,
      'upstream': dict(sorted(upstream.items())),
      'fingerprint': artifacts.fingerprint({'fields': fields, 'upstream': upstream}),
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
    diffs = artifacts.differences(marker.get('fields', {}), expected['fields'])
    if not diffs:
      diffs = [
        f'its inputs changed: {d}'
        for d in artifacts.differences(marker.get('upstream', {}), upstream)
      ]
    raise ConfigMismatchError(
      artifacts.mismatch_message(
        f'stage {self.name!r} in {self.directory(workdir)}',
        diffs,
        'To proceed: use a new --workdir, or rerun with the settings it was made with, or '
        f'delete {self.directory(workdir)} (and the stages after it) to recompute it.',
      )
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
    artifacts.write_json(self.directory(workdir) / MARKER, marker)
    return marker['fingerprint']
