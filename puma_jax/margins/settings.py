"""What a margin is measured with, and the provenance recorded with every margin sidecar.

`DeepFoolSettings` (norm, candidates, overshoot, max_iter, clip) and, per
stored quantity, the manifest `settings`: those DeepFool settings, the margin
model's fingerprint (`model_io.model_fingerprint`: sha256 over the variables'
key paths, dtypes, shapes and bytes) and a description of the module (class and simple
fields, which change margins without changing the weights).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from puma_jax.attacks.deepfool import NORMS
from puma_jax.model_io import model_fingerprint  # margins.model_fingerprint

# The quantities stored per example, the suffix of their sidecar tag, and their dtype.
QUANTITIES = {'margin': '', 'iterations': '_iterations', 'converged': '_converged'}
DTYPES = {'margin': np.float32, 'iterations': np.int32, 'converged': np.bool_}


@dataclasses.dataclass(frozen=True)
class DeepFoolSettings:
  """How margins are measured (recorded in every manifest).

  Attributes:
    norm: 'linf' or 'l2' (the threat model's norm, so margins are in eps units).
    num_candidates: classes considered per DeepFool step, the label included;
      bounds the per-step cost for 21k-class models.
    overshoot: the iterate is x + (1 + overshoot) * (sum of steps).
    max_iter: DeepFool steps per example at most.
    clip: (lo, hi) box every iterate is clipped to (images: (0, 1)), or None.
  """

  norm: str = 'linf'
  num_candidates: int = 10
  overshoot: float = 0.02
  max_iter: int = 50
  clip: tuple[float, float] | None = (0.0, 1.0)

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f'margins.norm={self.norm!r}: use one of {NORMS}')
    if int(self.num_candidates) != self.num_candidates or self.num_candidates < 2:
      raise ValueError(
        f'margins.num_candidates={self.num_candidates}: need an integer >= 2 '
        '(the label and at least one other class)'
      )
    if int(self.max_iter) != self.max_iter or self.max_iter < 1:
      raise ValueError(f'margins.max_iter={self.max_iter}: need an integer >= 1')
    if not (math.isfinite(self.overshoot) and self.overshoot >= 0):
      raise ValueError(f'margins.overshoot={self.overshoot}: need a finite number >= 0')
    if self.clip is not None:
      lo, hi = self.clip
      object.__setattr__(self, 'clip', (float(lo), float(hi)))
      if not lo < hi:
        raise ValueError(f'margins clip bounds {self.clip}: need lo < hi')

  def as_dict(self) -> dict[str, Any]:
    """JSON-able settings, as recorded in the manifests."""
    return {
      'norm': self.norm,
      'num_candidates': int(self.num_candidates),
      'overshoot': float(self.overshoot),
      'max_iter': int(self.max_iter),
      'clip': None if self.clip is None else list(self.clip),
    }


def settings_from_config(margins_config: Any) -> DeepFoolSettings:
  """`DeepFoolSettings` from `config.margins` (`clip=True` clips to the image box [0, 1])."""
  return DeepFoolSettings(
    norm=margins_config.norm,
    num_candidates=margins_config.num_candidates,
    overshoot=margins_config.overshoot,
    max_iter=margins_config.max_iter,
    clip=(0.0, 1.0) if margins_config.get('clip', True) else None,
  )


def describe_module(model: nn.Module) -> dict[str, Any]:
  """The module's class and its simple fields (numbers, strings, dtypes), for the manifest.

  Fields such as the normalisation statistics or the activation change margins
  without changing the weights, so they are recorded too. Values that have no
  stable text form are recorded by type name only.
  """
  fields = {}
  for f in dataclasses.fields(model):
    if f.name in ('parent', 'name'):
      continue
    fields[f.name] = _describe_value(getattr(model, f.name))
  return {'class': type(model).__name__, 'fields': fields}


def _describe_value(v: Any) -> Any:
  if v is None or isinstance(v, bool | int | float | str):
    return v
  if isinstance(v, list | tuple):
    return [_describe_value(x) for x in v]
  if isinstance(v, np.ndarray | jax.Array) and v.size <= 64:
    return np.asarray(v).tolist()
  try:
    return np.dtype(v).name
  except (TypeError, ValueError):
    pass
  if callable(v) and hasattr(v, '__name__'):
    return f'{getattr(v, "__module__", "")}.{v.__qualname__}'
  return f'<{type(v).__name__}>'


def sidecar_tags(tag: str = 'margins') -> dict[str, str]:
  """{'margin': tag, 'iterations': tag + '_iterations', 'converged': tag + '_converged'}."""
  return {q: tag + suffix for q, suffix in QUANTITIES.items()}


def sidecar_settings(
  model: nn.Module,
  settings: DeepFoolSettings,
  *,
  variables: Any = None,
  fingerprint: str | None = None,
  quantity: str = 'margin',
) -> dict[str, Any]:
  """The manifest settings of a quantity ('margin', 'iterations', 'converged').

  Pass these as `expected_settings` to `datasets.sidecar.load` to read margins
  that must come from this model and these settings. Give `variables` or their
  precomputed `fingerprint`.
  """
  if quantity not in QUANTITIES:
    raise ValueError(f'unknown quantity {quantity!r}; known: {sorted(QUANTITIES)}')
  if fingerprint is None:
    if variables is None:
      raise ValueError('sidecar_settings: give variables or fingerprint')
    fingerprint = model_fingerprint(variables)
  return {
    'quantity': quantity,
    'deepfool': settings.as_dict(),
    'model_fingerprint': fingerprint,
    'model': describe_module(model),
  }
