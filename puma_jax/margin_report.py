"""Summary of a margin run: statistics as JSON and a histogram of margins by source as PNG.

`summarize` describes the margins, DeepFool iteration counts and convergence
flags of each split (real, generated) overall and per class; `write_report`
writes `summary.json` and `margins_by_source.png`. NumPy and matplotlib only
(the Agg canvas, so no display and no global backend switch).

Per-class statistics are stored column-wise (`{'class': [...], 'count': [...],
'median': [...], ...}`), which stays compact for 21k classes and loads directly
into a DataFrame. Statistics of empty groups are null.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from puma_jax import artifacts

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
CLASS_QUANTILES = (0.1, 0.5, 0.9)
SUMMARY_FILE = 'summary.json'
HISTOGRAM_FILE = 'margins_by_source.png'


def _num(x: float) -> float | None:
  """A JSON-safe float: NaN becomes null, infinities stay (as strings would be worse)."""
  x = float(x)
  return None if np.isnan(x) else x


def describe(margins: np.ndarray, iterations: np.ndarray, converged: np.ndarray) -> dict[str, Any]:
  """Statistics of one group of examples.

  Args:
    margins: f32[n] signed DeepFool margins.
    iterations: f32[n] or i32[n] DeepFool steps taken by each example.
    converged: bool[n] (or 0/1) whether the prediction flipped within max_iter.

  Returns:
    count, mean, std, min, max, quantiles, fraction_negative, fraction_not_converged,
    not_converged, and the mean / max / median iteration count.
  """
  margins = np.asarray(margins, np.float64)
  iterations = np.asarray(iterations, np.float64)
  converged = np.asarray(converged).astype(bool)
  n = len(margins)
  if n == 0:
    return {'count': 0}
  finite = margins[np.isfinite(margins)]
  qs = np.quantile(margins, QUANTILES)
  return {
    'count': n,
    'mean': _num(finite.mean()) if len(finite) else None,
    'std': _num(finite.std()) if len(finite) else None,
    'min': _num(margins.min()),
    'max': _num(margins.max()),
    'quantiles': {f'{q:g}': _num(v) for q, v in zip(QUANTILES, qs, strict=True)},
    'fraction_negative': float(np.mean(margins < 0)),
    'fraction_not_converged': float(np.mean(~converged)),
    'not_converged': int(np.sum(~converged)),
    'iterations': {
      'mean': float(iterations.mean()),
      'median': float(np.median(iterations)),
      'max': int(iterations.max()),
    },
  }


def per_class(
  margins: np.ndarray, converged: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict[str, list]:
  """Column-wise per-class statistics (vectorised; fine for 21k classes and 10^7 examples).

  Args:
    margins: f32[n]; converged: bool[n]; labels: int[n] in [0, num_classes).
    num_classes: K; classes without examples get count 0 and null statistics.

  Returns:
    {'class', 'count', 'mean', 'q0.1', 'q0.5', 'q0.9', 'fraction_negative',
    'fraction_not_converged'}, each a list of K entries (linear-interpolated
    quantiles, as `np.quantile`).
  """
  margins = np.asarray(margins, np.float64)
  labels = np.asarray(labels, np.int64)
  converged = np.asarray(converged).astype(bool)
  if labels.shape != margins.shape:
    raise ValueError(f'labels {labels.shape} and margins {margins.shape} differ in shape')
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels outside [0, {num_classes})')
  count = np.bincount(labels, minlength=num_classes)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean = np.bincount(labels, margins, minlength=num_classes) / count
    negative = np.bincount(labels, margins < 0, minlength=num_classes) / count
    not_conv = np.bincount(labels, ~converged, minlength=num_classes) / count
  # Sorted by (class, margin): class c occupies [start_c, start_c + count_c).
  ordered = margins[np.lexsort((margins, labels))]
  start = np.concatenate([[0], np.cumsum(count)[:-1]])
  out: dict[str, list] = {'class': list(range(num_classes)), 'count': count.tolist()}
  out['mean'] = [_num(v) for v in mean]
  for q in CLASS_QUANTILES:
    pos = start + q * np.maximum(count - 1, 0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.ceil(pos).astype(np.int64)
    frac = pos - lo
    safe = count > 0
    lo, hi = np.where(safe, lo, 0), np.where(safe, hi, 0)
    if len(ordered):
      with np.errstate(invalid='ignore'):
        value = ordered[lo] + frac * (ordered[hi] - ordered[lo])
      value = np.where(ordered[lo] == ordered[hi], ordered[lo], value)  # keeps infinities
    else:
      value = np.zeros(num_classes)
    out[f'q{q:g}'] = [_num(v) if ok else None for v, ok in zip(value, safe, strict=True)]
  out['fraction_negative'] = [_num(v) for v in negative]
  out['fraction_not_converged'] = [_num(v) for v in not_conv]
  return out


def summarize(
  arrays: Mapping[str, Mapping[str, np.ndarray]],
  labels: Mapping[str, np.ndarray],
  num_classes: Mapping[str, int],
  *,
  settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The summary of a margin run.

  Args:
    arrays: per split key ('real', 'generated', ...): {'margin': f32[n],
      'iterations': f32[n], 'converged': f32[n] or bool[n]}.
    labels: per split key, int[n] labels in global order.
    num_classes: per split key.
    settings: recorded as is (DeepFool settings, model fingerprint).

  Returns:
    {'settings', 'overall', 'by_source': {key: {... , 'by_class': {...}}}}.
  """
  by_source = {}
  for key, a in arrays.items():
    stats = describe(a['margin'], a['iterations'], a['converged'])
    stats['by_class'] = per_class(a['margin'], a['converged'], labels[key], num_classes[key])
    by_source[key] = stats
  cat = {
    name: np.concatenate([np.asarray(a[name], np.float64) for a in arrays.values()])
    for name in ('margin', 'iterations', 'converged')
  }
  return {
    'settings': dict(settings or {}),
    'overall': describe(cat['margin'], cat['iterations'], cat['converged']),
    'by_source': by_source,
  }


def plot_histogram(
  margins: Mapping[str, np.ndarray],
  path: str | os.PathLike,
  *,
  norm: str = '',
  converged: Mapping[str, np.ndarray] | None = None,
  bins: int = 100,
  title: str = 'DeepFool margins by source',
) -> Path:
  """Writes (atomically) a PNG with one density histogram of margins per source.

  Non-finite margins are left out of the bins and counted in the legend, as is
  the share of examples DeepFool did not converge on (if `converged` is given).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  finite = {k: np.asarray(v, np.float64)[np.isfinite(v)] for k, v in margins.items()}
  values = [v for v in finite.values() if len(v)]
  lo = min((v.min() for v in values), default=-1.0)
  hi = max((v.max() for v in values), default=1.0)
  if lo == hi:
    lo, hi = lo - 0.5, hi + 0.5
  edges = np.linspace(lo, hi, bins + 1)
  fig = Figure(figsize=(7, 4.2), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for key, v in finite.items():
    total = len(margins[key])
    label = f'{key}: {total:,} examples, {np.mean(np.asarray(margins[key]) < 0):.1%} negative'
    if converged is not None:
      label += f', {np.mean(~np.asarray(converged[key]).astype(bool)):.1%} not converged'
    if len(v) < total:
      label += f', {total - len(v):,} non-finite'
    if len(v):
      ax.hist(v, bins=edges, density=True, histtype='step', linewidth=1.6, label=label)
  ax.axvline(0.0, color='0.4', linewidth=0.8, linestyle='--')
  ax.set_xlabel(f'signed margin ({norm})' if norm else 'signed margin')
  ax.set_ylabel('density')
  ax.set_title(title)
  ax.legend(loc='best', fontsize='small')
  fig.tight_layout()
  path = Path(path)
  with artifacts.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png')
  return path


def write_report(
  summary: Mapping[str, Any],
  margins: Mapping[str, np.ndarray],
  directory: str | os.PathLike,
  *,
  norm: str = '',
  converged: Mapping[str, np.ndarray] | None = None,
) -> tuple[Path, Path]:
  """Writes `summary.json` and `margins_by_source.png` into `directory` (atomic writes)."""
  directory = Path(directory)
  json_path = artifacts.write_json(directory / SUMMARY_FILE, dict(summary))
  png_path = plot_histogram(margins, directory / HISTOGRAM_FILE, norm=norm, converged=converged)
  return json_path, png_path
