"""What a margin is measured with, and the provenance recorded with every margin sidecar.

The estimator (`attacks.margin_estimators.ESTIMATORS`, `c.margins.estimator`)
and its settings: `DeepFoolSettings` (norm, candidates, overshoot, max_iter,
clip) for DeepFool, `EstimatorSettings` (name, norm, candidates, clip and the
estimator's own options) for the others. Per stored quantity, the manifest
`settings` hold those settings under the estimator's name ('deepfool',
'first_order', 'fab'), the margin model's fingerprint (`model_io.model_fingerprint`:
sha256 over the variables' key paths, dtypes, shapes and bytes) and a
description of the module (class and simple fields, which change margins
without changing the weights).

Each estimator stores its sidecars under its own tag (`default_tag`): 'margins'
for DeepFool (the tag and manifests made before other estimators existed),
'margins_<name>' for the others, so the margins of several estimators live side
by side and each resumes on its own.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from puma_jax.attacks import margin_estimators
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

  @property
  def estimator(self) -> str:
    return 'deepfool'

  def options_dict(self) -> dict[str, Any]:
    """The estimator's own keyword settings (`ESTIMATORS['deepfool'](..., **options)`)."""
    return {'overshoot': float(self.overshoot), 'max_iter': int(self.max_iter)}

  def as_dict(self) -> dict[str, Any]:
    """JSON-able settings, as recorded in the manifests."""
    return {
      'norm': self.norm,
      'num_candidates': int(self.num_candidates),
      'overshoot': float(self.overshoot),
      'max_iter': int(self.max_iter),
      'clip': None if self.clip is None else list(self.clip),
    }

  def manifest(self) -> dict[str, Any]:
    """{'deepfool': settings}: the manifest entry (unchanged since DeepFool was the only one)."""
    return {'deepfool': self.as_dict()}


@dataclasses.dataclass(frozen=True)
class EstimatorSettings:
  """How margins are measured by an estimator other than DeepFool (recorded in every manifest).

  Attributes:
    estimator: a name in `attacks.margin_estimators.ESTIMATORS` other than 'deepfool'
      (use `DeepFoolSettings` for DeepFool).
    norm: 'linf' or 'l2'.
    num_candidates: classes considered, the label included.
    clip: (lo, hi) box, or None (fab needs (0, 1)).
    options: the estimator's own settings as sorted (name, value) pairs (hashable, so
      the compiled program is cached per settings), e.g. fab's num_steps and restarts.
  """

  estimator: str
  norm: str = 'linf'
  num_candidates: int = 10
  clip: tuple[float, float] | None = (0.0, 1.0)
  options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    margin_estimators.check_name(self.estimator)
    if self.estimator == 'deepfool':
      raise ValueError('EstimatorSettings: use DeepFoolSettings for the deepfool estimator')
    # The shared checks (norm, candidates, clip) are DeepFool's.
    base = DeepFoolSettings(norm=self.norm, num_candidates=self.num_candidates, clip=self.clip)
    object.__setattr__(self, 'clip', base.clip)
    options = tuple(sorted(dict(self.options).items()))
    known = margin_estimators.SETTINGS[self.estimator]
    unknown = [k for k, _ in options if k not in known]
    if unknown:
      raise ValueError(
        f'c.margins.{self.estimator} settings {unknown} are unknown; known: {list(known)}'
      )
    object.__setattr__(self, 'options', options)

  def options_dict(self) -> dict[str, Any]:
    """The estimator's own keyword settings (`ESTIMATORS[estimator](..., **options)`)."""
    return dict(self.options)

  def as_dict(self) -> dict[str, Any]:
    """JSON-able settings, as recorded in the manifests."""
    return {
      'norm': self.norm,
      'num_candidates': int(self.num_candidates),
      'clip': None if self.clip is None else list(self.clip),
      **self.options_dict(),
    }

  def manifest(self) -> dict[str, Any]:
    """{estimator name: settings}: the manifest entry."""
    return {self.estimator: self.as_dict()}


MarginSettings = DeepFoolSettings | EstimatorSettings


def default_tag(estimator: str) -> str:
  """The sidecar tag of an estimator's margins: 'margins' (deepfool), 'margins_<name>'."""
  margin_estimators.check_name(estimator)
  return 'margins' if estimator == 'deepfool' else f'margins_{estimator}'


def settings_from_config(margins_config: Any) -> MarginSettings:
  """The settings of the estimator `config.margins` names (`clip=True`: the box [0, 1]).

  `DeepFoolSettings` for c.margins.estimator='deepfool' (the default, also when
  the field is absent), else `EstimatorSettings` with c.margins.<estimator>.*.
  """
  name, options = margin_estimators.settings_from_config(margins_config)
  clip = (0.0, 1.0) if margins_config.get('clip', True) else None
  if name == 'deepfool':
    return DeepFoolSettings(
      norm=margins_config.norm,
      num_candidates=margins_config.num_candidates,
      clip=clip,
      **options,
    )
  return EstimatorSettings(
    name,
    norm=margins_config.norm,
    num_candidates=margins_config.num_candidates,
    clip=clip,
    options=tuple(sorted(options.items())),
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
  settings: MarginSettings,
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
    **settings.manifest(),
    'model_fingerprint': fingerprint,
    'model': describe_module(model),
  }
