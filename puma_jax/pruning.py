"""Margins -> kept examples and per-example attack radii (NumPy, deterministic, pure).

Every training example has a signed DeepFool margin m_i (its distance to the
margin model's decision boundary; negative when that model misclassifies it).
A strategy drops a fraction of the examples by margin, and an eps rule gives
each kept example its own attack radius eps_i:

strategies (`c.prune.strategy`)
  none        keep everything.
  random      drop a uniformly random subset (seeded by `c.seed`).
  prune_high  drop the highest margins ("prune easy").
  prune_low   drop the lowest margins ("prune hard").
  puma        drop the highest margins, then give every kept example the eps
              of `c.prune.eps_rule` (PUMA). The other strategies train with a
              constant eps, the baselines PUMA is compared against.

eps rules (`c.prune.eps_rule`, used by `puma`)
  constant    eps_i = eps.
  puma        eps_i = clip(m_i, -eps, eps): the margin inside (-eps, eps), eps at
              or above it, -eps at or below -eps.
  clip0       eps_i = clip(m_i, 0, eps): misclassified examples are trained clean.

Options: `c.prune.fraction` in [0, 1) of the pool is dropped, rounded half up;
`c.prune.scope` is 'generated' (the pool is the generated data; real data are all
kept) or 'joint' (real and generated ranked together); with
`c.prune.class_balanced` every class of the pool loses the same fraction (class
quotas by largest remainder, so the total equals the unbalanced one).

Margins that did not converge (`c.prune.unconverged`; DeepFool ran `max_iter`
steps without flipping the prediction, so its margin is only the distance reached
so far, a lower bound), used by the strategies that read margins:
  keep_distance  use the distance reached, as if it were the margin.
  infinite       the margin is +inf (or -inf for a misclassified example): a correctly
                 classified one is among the first pruned by 'puma'/'prune_high' and,
                 if kept, gets the full eps. The default (docs/recipe.md says why).
  exclude        the example is removed from the training data of every source before
                 ranking; `fraction` then applies to the rest of the pool.
`stats['unconverged']` counts them per source.

Ties are broken by a stable sort on (margin, source, index): among equal margins
the example of the higher (source, index) counts as higher. Sources are 'real'
(id 0) and 'generated' (id 1); an index is the example's position in its source.
"""

import dataclasses
import fractions
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from puma_jax import artifacts

SOURCES = ('real', 'generated')  # position = the source id carried by batches
STRATEGIES = ('none', 'random', 'prune_high', 'prune_low', 'puma')
EPS_RULES = ('constant', 'puma', 'clip0')
UNCONVERGED = ('keep_distance', 'infinite', 'exclude')
SCOPES = ('generated', 'joint')
MARGIN_STRATEGIES = ('prune_high', 'prune_low', 'puma')

KEPT_FILE = 'kept.npz'
SETTINGS_FILE = 'prune.json'
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PruneSettings:
  """What to prune and how to set eps; validated on construction.

  Attributes:
    strategy: one of `STRATEGIES` (c.prune.strategy).
    fraction: share of the pool to drop, in [0, 1) (c.prune.fraction).
    scope: 'generated' or 'joint' (c.prune.scope).
    class_balanced: drop the same fraction within every class (c.prune.class_balanced).
    eps_rule: one of `EPS_RULES`, applied by strategy 'puma' (c.prune.eps_rule).
    eps: the attack radius of the threat model, > 0 (c.attack.eps).
    seed: seed of the 'random' strategy (c.seed).
    unconverged: one of `UNCONVERGED`, what a margin that did not converge means
      (c.prune.unconverged).
  """

  strategy: str = 'puma'
  fraction: float = 0.3
  scope: str = 'generated'
  class_balanced: bool = False
  eps_rule: str = 'puma'
  eps: float = 8 / 255
  seed: int = 0
  unconverged: str = 'infinite'

  def __post_init__(self):
    _check_choice(self.strategy, STRATEGIES, 'c.prune.strategy')
    _check_choice(self.unconverged, UNCONVERGED, 'c.prune.unconverged')
    _check_choice(self.scope, SCOPES, 'c.prune.scope')
    _check_choice(self.eps_rule, EPS_RULES, 'c.prune.eps_rule')
    if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
      raise ValueError(f'c.prune.fraction must be a number in [0, 1), got {self.fraction!r}')
    if not 0.0 <= self.fraction < 1.0:
      raise ValueError(
        f'c.prune.fraction={self.fraction!r} is outside [0, 1); it is the share of the pool '
        'that is dropped (0.3 drops 30%).'
      )
    if not isinstance(self.class_balanced, bool):
      raise ValueError(f'c.prune.class_balanced must be True or False, got {self.class_balanced!r}')
    if not (isinstance(self.eps, int | float) and np.isfinite(self.eps) and self.eps > 0):
      raise ValueError(f'c.attack.eps must be a finite number > 0, got {self.eps!r}')
    if not isinstance(self.seed, int) or isinstance(self.seed, bool):
      raise ValueError(f'c.seed must be an integer, got {self.seed!r}')

  @property
  def effective_eps_rule(self) -> str:
    """The rule actually applied: `eps_rule` for strategy 'puma', 'constant' otherwise."""
    return self.eps_rule if self.strategy == 'puma' else 'constant'

  @property
  def needs_margins(self) -> bool:
    return self.strategy in MARGIN_STRATEGIES

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def settings_from_config(config: Any) -> PruneSettings:
  """`PruneSettings` from a full config (`c.prune.*`, `c.attack.eps`, `c.seed`)."""
  p = config.prune
  return PruneSettings(
    strategy=p.strategy,
    fraction=p.fraction,
    scope=p.scope,
    class_balanced=p.class_balanced,
    eps_rule=p.eps_rule,
    eps=config.attack.eps,
    seed=config.seed,
    unconverged=p.unconverged,
  )


def _check_choice(value: Any, known: tuple[str, ...], field: str) -> None:
  if value not in known:
    raise ValueError(f'unknown {field}={value!r}; known: {", ".join(known)}')


def compute_eps(margins: np.ndarray, eps: float, rule: str) -> np.ndarray:
  """Per-example attack radius from signed margins.

  Args:
    margins: f[N] signed margins (no NaN).
    eps: the threat model's radius, > 0.
    rule: 'constant' (eps), 'puma' (clip(m, -eps, eps)) or 'clip0' (clip(m, 0, eps)).

  Returns:
    f32[N] radii; 'puma' gives values in [-eps, eps], 'clip0' in [0, eps].
  """
  _check_choice(rule, EPS_RULES, 'c.prune.eps_rule')
  m = np.asarray(margins, np.float64)
  if rule == 'constant':
    out = np.full(m.shape, eps)
  elif rule == 'puma':
    out = np.clip(m, -eps, eps)
  else:
    out = np.clip(m, 0.0, eps)
  return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PruneResult:
  """Kept examples and their eps, per source, with the settings and statistics.

  Attributes:
    settings: the `PruneSettings` that made this result.
    num_examples: source -> examples before pruning.
    kept: source -> i32[n_kept] kept indices (positions in the source), ascending.
    eps: source -> f32[n_kept] attack radius of each kept example (aligned with `kept`).
    stats: JSON-ready statistics (see `select`).
    provenance: JSON-ready facts about the inputs (e.g. the margin manifests).
  """

  settings: PruneSettings
  num_examples: dict[str, int]
  kept: dict[str, np.ndarray]
  eps: dict[str, np.ndarray]
  stats: dict[str, Any]
  provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes `kept.npz` and `prune.json` (settings, stats, checksum) atomically.

    `prune.json` is written last and names the checksum of `kept.npz`, so a
    crash between the two leaves a pair that `load` rejects rather than mixes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for source in self.kept:
      arrays[f'kept_{source}'] = self.kept[source]
      arrays[f'eps_{source}'] = self.eps[source]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    artifacts.write_bytes(directory / KEPT_FILE, data)
    meta = {
      'format': FORMAT_VERSION,
      'settings': self.settings.to_dict(),
      'effective_eps_rule': self.settings.effective_eps_rule,
      'num_examples': self.num_examples,
      'stats': self.stats,
      'provenance': self.provenance,
      'kept_sha256': artifacts.sha256_bytes(data),
    }
    artifacts.write_json(directory / SETTINGS_FILE, meta)

  @classmethod
  def load(cls, directory: str | os.PathLike) -> 'PruneResult':
    """Reads a result written by `save`; raises if the two files do not belong together."""
    directory = Path(directory)
    meta_path, kept_path = directory / SETTINGS_FILE, directory / KEPT_FILE
    if not meta_path.exists() or not kept_path.exists():
      raise FileNotFoundError(
        f'no pruning result in {directory} (needs {KEPT_FILE} and {SETTINGS_FILE})'
      )
    meta = artifacts.read_json(meta_path)
    if meta.get('format') != FORMAT_VERSION:
      raise ValueError(f'{meta_path} has format {meta.get("format")!r}, expected {FORMAT_VERSION}')
    if artifacts.sha256_file(kept_path) != meta['kept_sha256']:
      raise ValueError(
        f'{kept_path} does not match the checksum in {meta_path} (an interrupted write?); '
        'rerun the prune stage.'
      )
    kept, eps = {}, {}
    with np.load(kept_path) as f:
      for source in meta['num_examples']:
        kept[source], eps[source] = f[f'kept_{source}'], f[f'eps_{source}']
    return cls(
      settings=PruneSettings(**meta['settings']),
      num_examples={k: int(v) for k, v in meta['num_examples'].items()},
      kept=kept,
      eps=eps,
      stats=meta['stats'],
      provenance=meta['provenance'],
    )


def select(
  settings: PruneSettings,
  *,
  labels: Mapping[str, np.ndarray],
  margins: Mapping[str, np.ndarray] | None = None,
  converged: Mapping[str, np.ndarray] | None = None,
  num_classes: int | None = None,
  provenance: Mapping[str, Any] | None = None,
) -> PruneResult:
  """Chooses the kept examples of every source and their eps.

  Args:
    settings: what to do (see the module docstring).
    labels: source ('real', 'generated') -> i[N_s] class labels in [0, K); the
      sources present here are the training data. N_s is the source's size.
    margins: source -> f[N_s] signed margins, for every source in `labels`.
      Needed by 'prune_high', 'prune_low' and 'puma'; optional otherwise (then
      used only for statistics).
    converged: source -> bool[N_s], whether DeepFool converged on each example; the
      others are treated by `settings.unconverged`. None: all converged.
    num_classes: K; defaults to max label + 1.
    provenance: facts about the inputs to record with the result.

  Returns:
    A `PruneResult`. Its `stats` hold: `kept` / `pruned` counts per source,
    `kept_per_class` and `num_per_class` (lists of length K) per source, `eps`
    (count, mean, quantiles '0' (min) to '1' (max), and the counts `reduced` (< eps), `negative`
    (< 0), `zero` (== 0) and `full` (== eps)) over all kept examples and per
    source, and, with margins, the margin quantiles of kept and pruned
    examples per source, and `unconverged`: the `rule`, and per source the `count` of
    margins that did not converge and how many were `excluded` (rule 'exclude').
  """
  labels = _check_labels(labels)
  num_examples = {s: len(v) for s, v in labels.items()}
  max_label = max((int(v.max()) for v in labels.values() if len(v)), default=-1)
  if num_classes is None:
    num_classes = max_label + 1
  elif max_label >= num_classes:
    raise ValueError(f'labels go up to {max_label} but num_classes is {num_classes}')
  margins = _check_margins(margins, num_examples, required=settings.needs_margins)
  unconverged = _check_unconverged(converged, num_examples)
  usable = {s: np.ones(n, bool) for s, n in num_examples.items()}
  if margins is not None and settings.needs_margins:
    if settings.unconverged == 'infinite':
      margins = {s: unconverged_as_infinite(m, unconverged[s]) for s, m in margins.items()}
    elif settings.unconverged == 'exclude':
      usable = {s: ~unconverged[s] for s in num_examples}

  if settings.scope == 'generated':
    pool_sources = ['generated']
    if 'generated' not in labels and settings.strategy != 'none' and settings.fraction > 0:
      raise ValueError(
        "c.prune.scope='generated' but the training data have no generated source; set "
        "c.prune.scope='joint' to prune the real data, or c.prune.fraction=0."
      )
  else:
    pool_sources = list(SOURCES)
  pool_sources = [s for s in pool_sources if num_examples.get(s, 0) > 0]

  keep = {s: u.copy() for s, u in usable.items()}
  if settings.strategy != 'none' and settings.fraction > 0 and pool_sources:
    src = np.concatenate(
      [np.full(int(usable[s].sum()), SOURCES.index(s), np.int8) for s in pool_sources]
    )
    idx = np.concatenate([np.flatnonzero(usable[s]).astype(np.int64) for s in pool_sources])
    cls = np.concatenate([labels[s][usable[s]] for s in pool_sources])
    if settings.strategy == 'random':
      key = np.random.default_rng(settings.seed).random(len(src))
    else:
      key = np.concatenate([margins[s][usable[s]] for s in pool_sources]).astype(np.float64)
    drop = _drop_mask(
      key,
      src,
      idx,
      cls if settings.class_balanced else None,
      fraction=settings.fraction,
      highest=settings.strategy != 'prune_low',
    )
    for s in pool_sources:
      keep[s][idx[(src == SOURCES.index(s)) & drop]] = False

  kept = {s: np.flatnonzero(k).astype(np.int32) for s, k in keep.items()}
  rule = settings.effective_eps_rule
  if rule == 'constant':
    eps = {s: np.full(len(k), settings.eps, np.float32) for s, k in kept.items()}
  else:
    eps = {s: compute_eps(margins[s][k], settings.eps, rule) for s, k in kept.items()}
  stats = _statistics(settings, labels, margins, keep, kept, eps, num_classes)
  stats['unconverged'] = {
    'rule': settings.unconverged,
    'count': {s: int(u.sum()) for s, u in unconverged.items()},
    'excluded': {s: int((~u).sum()) for s, u in usable.items()},
  }
  stats['pruned'] = {s: int((~keep[s] & usable[s]).sum()) for s in keep}  # by the strategy
  return PruneResult(
    settings=settings,
    num_examples=num_examples,
    kept=kept,
    eps=eps,
    stats=stats,
    provenance=dict(provenance or {}),
  )


def _check_labels(labels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  if not labels:
    raise ValueError('no training data: labels of at least one source are needed')
  out = {}
  for s, v in labels.items():
    if s not in SOURCES:
      raise ValueError(f'unknown source {s!r}; known: {SOURCES}')
    v = np.asarray(v)
    if v.ndim != 1 or not np.issubdtype(v.dtype, np.integer):
      raise ValueError(f'labels of {s!r} must be a 1-D integer array, got {v.dtype}{v.shape}')
    if len(v) and v.min() < 0:
      raise ValueError(f'labels of {s!r} contain negative values')
    if len(v) >= 2**31:
      raise ValueError(f'{s!r} has {len(v)} examples; indices are stored as int32')
    out[s] = v.astype(np.int64)
  return out


def _check_margins(
  margins: Mapping[str, np.ndarray] | None, num_examples: dict[str, int], *, required: bool
) -> dict[str, np.ndarray] | None:
  if margins is None:
    if required:
      raise ValueError(
        'this c.prune.strategy ranks examples by margin, but no margins were given; '
        "compute them first or use c.prune.strategy='none' or 'random'."
      )
    return None
  out = _source_arrays(
    margins,
    num_examples,
    'margins',
    missing='the margin stage covers every source',
    stale='the margins are stale: recompute them (c.margins.recompute=True).',
  )
  for s, m in out.items():
    nan = int(np.isnan(m).sum())
    if nan:
      raise ValueError(
        f'{nan} margins of {s!r} are NaN (first at index {int(np.flatnonzero(np.isnan(m))[0])}); '
        'c.prune.strategy needs finite or infinite margins: recompute them '
        '(c.margins.recompute=True).'
      )
  return out


def _source_arrays(
  arrays: Mapping[str, np.ndarray],
  num_examples: dict[str, int],
  what: str,
  *,
  missing: str,
  stale: str,
) -> dict[str, np.ndarray]:
  """source -> arrays[source] as an ndarray [N_s], checked present and of length N_s.

  Args:
    arrays: source -> [N_s] values (margins, converged flags).
    num_examples: source -> N_s, the sources to take.
    what: the values' name in the errors.
    missing: the error's fix when a source is absent.
    stale: the error's fix when a source's array has another shape.
  """
  out = {}
  for s, n in num_examples.items():
    if s not in arrays:
      raise ValueError(f'{what} of source {s!r} are missing; {missing}')
    a = np.asarray(arrays[s])
    if a.shape != (n,):
      raise ValueError(
        f'{what} of {s!r} have shape {a.shape} but the source has {n} examples; {stale}'
      )
    out[s] = a
  return out


def unconverged_as_infinite(margin: np.ndarray, unconverged: np.ndarray) -> np.ndarray:
  """The 'infinite' rule: +-inf, by the margin's sign, where the margin did not converge."""
  return np.where(unconverged, np.copysign(np.inf, margin), margin)


def _check_unconverged(
  converged: Mapping[str, np.ndarray] | None, num_examples: dict[str, int]
) -> dict[str, np.ndarray]:
  """source -> bool[N_s], True where DeepFool did not converge (none without `converged`)."""
  if converged is None:
    return {s: np.zeros(n, bool) for s, n in num_examples.items()}
  checked = _source_arrays(
    converged,
    num_examples,
    'converged flags',
    missing='the margin stage writes them',
    stale='recompute the margins (c.margins.recompute=True).',
  )
  return {s: ~c.astype(bool) for s, c in checked.items()}


def _quota(fraction: float, n: np.ndarray) -> np.ndarray:
  """Exact fraction * n rounded half up, elementwise (fraction as the decimal written)."""
  f = fractions.Fraction(repr(float(fraction)))
  return (2 * f.numerator * n.astype(object) + f.denominator) // (2 * f.denominator)


def _class_quotas(fraction: float, counts: np.ndarray) -> np.ndarray:
  """Per-class numbers to drop: floor(fraction * n_c) plus one for the largest remainders.

  The total equals `_quota(fraction, counts.sum())`; ties among remainders go to
  the lower class id.
  """
  f = fractions.Fraction(repr(float(fraction)))
  exact = counts.astype(object) * f.numerator  # / f.denominator
  base = exact // f.denominator
  remainder = exact - base * f.denominator
  total = int(_quota(fraction, np.array([counts.sum()]))[0])
  extra = total - int(base.sum())
  order = sorted(range(len(counts)), key=lambda c: (-remainder[c], c))
  quotas = base.astype(np.int64)
  quotas[order[:extra]] += 1
  return quotas


def _drop_mask(
  key: np.ndarray,
  src: np.ndarray,
  idx: np.ndarray,
  cls: np.ndarray | None,
  *,
  fraction: float,
  highest: bool,
) -> np.ndarray:
  """bool[N]: the examples of the pool to drop, ranked by (key, source, index)."""
  n = len(key)
  if cls is None:
    order = np.lexsort((idx, src, key))
    k = int(_quota(fraction, np.array([n]))[0])
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n)
    return ranks >= n - k if highest else ranks < k
  order = np.lexsort((idx, src, key, cls))
  counts = np.bincount(cls, minlength=int(cls.max()) + 1)
  quotas = _class_quotas(fraction, counts)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  sorted_cls = cls[order]
  rank_in_class = np.arange(n) - starts[sorted_cls]
  k = quotas[sorted_cls]
  drop_sorted = rank_in_class >= counts[sorted_cls] - k if highest else rank_in_class < k
  drop = np.empty(n, bool)
  drop[order] = drop_sorted
  return drop


_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def _summary(values: np.ndarray) -> dict[str, Any]:
  if not len(values):
    return {'count': 0}
  v = np.asarray(values, np.float64)
  finite = v[np.isfinite(v)]
  out = {'count': int(len(v)), 'num_infinite': int(len(v) - len(finite))}
  if len(finite):
    out['mean'] = float(finite.mean())
    out['quantiles'] = {
      f'{q:g}': float(x) for q, x in zip(_QUANTILES, np.quantile(finite, _QUANTILES), strict=True)
    }
  return out


def _eps_summary(eps: np.ndarray, full: float) -> dict[str, Any]:
  full32 = np.float32(full)
  out = _summary(eps)
  out.update(
    reduced=int((eps < full32).sum()),
    negative=int((eps < 0).sum()),
    zero=int((eps == 0).sum()),
    full=int((eps == full32).sum()),
  )
  return out


def _statistics(
  settings: PruneSettings,
  labels: dict[str, np.ndarray],
  margins: dict[str, np.ndarray] | None,
  keep: dict[str, np.ndarray],
  kept: dict[str, np.ndarray],
  eps: dict[str, np.ndarray],
  num_classes: int,
) -> dict[str, Any]:
  stats: dict[str, Any] = {
    'kept': {s: int(len(k)) for s, k in kept.items()},
    'pruned': {s: int((~k).sum()) for s, k in keep.items()},
    'num_per_class': {s: np.bincount(v, minlength=num_classes).tolist() for s, v in labels.items()},
    'kept_per_class': {
      s: np.bincount(labels[s][kept[s]], minlength=num_classes).tolist() for s in kept
    },
    'eps': {'all': _eps_summary(np.concatenate(list(eps.values())), settings.eps)},
  }
  for s in eps:
    stats['eps'][s] = _eps_summary(eps[s], settings.eps)
  if margins is not None:
    stats['margins'] = {
      s: {'kept': _summary(margins[s][keep[s]]), 'pruned': _summary(margins[s][~keep[s]])}
      for s in margins
    }
  return stats
