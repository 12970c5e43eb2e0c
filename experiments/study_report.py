"""The study's report: statistics over seeds, the summary table, comparisons, plots.

Pure functions of the rows `experiments/study.py` collects (one per run: its setting,
strategy, pruning ratio, seed and accuracies); the study writes their output.
"""

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from puma_jax import tables

METRICS = ('clean_acc', 'pgd_ce_acc', 'pgd_cw_acc', 'worst_case_acc')
METRIC_LABELS = {
  'clean_acc': 'clean',
  'pgd_ce_acc': 'PGD-CE',
  'pgd_cw_acc': 'PGD-CW',
  'worst_case_acc': 'PGD worst',
  'autoattack_acc': 'AutoAttack',
}
# Every summarised column: the accuracies, then the mean training radius (the mean over the
# logged steps of the batches' mean eps: what the margins did to the attack).
COLUMNS = (*METRICS, 'autoattack_acc', 'mean_eps')


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return float(np.mean(values)), std


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Mean and standard deviation over seeds per setting, in grid order."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault(r['setting'], []).append(r)
  out = []
  for name, rs in groups.items():
    s = {'setting': name, 'strategy': rs[0]['strategy'], 'ratio': rs[0]['ratio'], 'seeds': len(rs)}
    for m in COLUMNS:
      s[f'{m}_mean'], s[f'{m}_std'] = _stats([r[m] for r in rs])
    s['values'] = {m: [r[m] for r in rs] for m in COLUMNS}
    out.append(s)
  return out


def best_puma(summary: Sequence[Mapping[str, Any]]) -> str | None:
  puma = [s for s in summary if s['strategy'] == 'puma' and s['worst_case_acc_mean'] is not None]
  return max(puma, key=lambda s: s['worst_case_acc_mean'])['setting'] if puma else None


def within_spread(a: Mapping[str, Any], b: Mapping[str, Any], metric: str) -> bool | None:
  """Whether the difference of two settings' means is within twice its standard error.

  None when either has fewer than two seeds (no spread to compare with).
  """
  va = [v for v in a['values'][metric] if v is not None]
  vb = [v for v in b['values'][metric] if v is not None]
  if len(va) < 2 or len(vb) < 2:
    return None
  se = math.sqrt(np.var(va, ddof=1) / len(va) + np.var(vb, ddof=1) / len(vb))
  return abs(np.mean(va) - np.mean(vb)) <= 2 * se


def _cell(s: Mapping[str, Any], metric: str) -> str:
  mean, std = s[f'{metric}_mean'], s[f'{metric}_std']
  if mean is None:
    return '-'
  return f'{mean:.1f}' if std is None else f'{mean:.1f} ± {std:.1f}'


def comparisons(
  summary: Sequence[Mapping[str, Any]], baseline: str, compare_ratio: float
) -> list[str]:
  """One line per compared pair and metric: the difference and whether the seeds support it.

  Every setting against `baseline` (PUMA at ratio 0 first), then every setting at
  `compare_ratio` against PUMA at that ratio.
  """
  by = {s['setting']: s for s in summary}
  pairs = [(baseline, 'puma_f0')]
  pairs += [(baseline, s['setting']) for s in summary if s['setting'] not in (baseline, 'puma_f0')]
  ref = f'puma_f{compare_ratio:g}'
  pairs += [
    (ref, s['setting']) for s in summary if s['ratio'] == compare_ratio and s['setting'] != ref
  ]
  lines = []
  for a, b in pairs:
    if a not in by or b not in by:
      continue
    for m in ('clean_acc', 'worst_case_acc', 'autoattack_acc'):
      if by[a][f'{m}_mean'] is None or by[b][f'{m}_mean'] is None:
        continue
      diff = by[b][f'{m}_mean'] - by[a][f'{m}_mean']
      verdict = within_spread(by[a], by[b], m)
      text = {
        None: 'one seed: spread unknown',
        True: 'within the seed spread',
        False: 'beyond the seed spread',
      }[verdict]
      lines.append(f'- {b} vs {a}, {METRIC_LABELS[m]}: {diff:+.1f} points ({text}).')
  return lines


def markdown(
  summary: Sequence[Mapping[str, Any]],
  notes: Sequence[str],
  *,
  title: str,
  preamble: Sequence[str],
  labels: Mapping[str, str],
  baseline: str,
  compare_ratio: float,
) -> str:
  """summary.md: the title, `preamble` lines, the table, the notes and the comparisons."""
  lines = [
    f'# {title}',
    '',
    *preamble,
    '',
    tables.markdown_table(
      ['setting', 'seeds', 'clean', 'PGD-CE', 'PGD-CW', 'PGD worst', 'AutoAttack', 'train eps'],
      [
        [
          labels.get(s['setting'], s['setting']),
          s['seeds'],
          *(_cell(s, m) for m in (*METRICS, 'autoattack_acc')),
          '-' if s['mean_eps_mean'] is None else f'{s["mean_eps_mean"]:.3f}',
        ]
        for s in summary
      ],
    ),
  ]
  lines += ['', '## Notes', '', *[f'- {n}' for n in notes], '']
  lines += [
    '## Differences',
    '',
    'A difference is "within the seed spread" when it is at most twice its standard error '
    '(sqrt(s_a²/n_a + s_b²/n_b) over the seeds); such a difference is not supported by the data.',
    '',
    *comparisons(summary, baseline, compare_ratio),
    '',
  ]
  return '\n'.join(lines)


def _png(fig: Any) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=120)
  return buf.getvalue()


def plot(summary: Sequence[Mapping[str, Any]], out: Path, baseline: str) -> None:
  """accuracy_vs_robustness.png and robust_vs_ratio.png (with `baseline`'s line)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  from puma_jax import artifacts  # noqa: PLC0415

  colors = {'none': 'black', 'random': 'tab:gray', 'prune_high': 'tab:red'}
  colors |= {'prune_low': 'tab:blue', 'puma': 'tab:green'}
  fig = Figure(figsize=(6, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for s in summary:
    ax.errorbar(
      s['clean_acc_mean'],
      s['worst_case_acc_mean'],
      xerr=s['clean_acc_std'] or 0.0,
      yerr=s['worst_case_acc_std'] or 0.0,
      fmt='*' if s['strategy'] == 'none' else 'o',
      color=colors.get(s['strategy'], 'tab:purple'),
      capsize=2,
    )
    ax.annotate(s['setting'], (s['clean_acc_mean'], s['worst_case_acc_mean']), fontsize=6)
  ax.set_xlabel('clean accuracy (%)')
  ax.set_ylabel('PGD worst-case accuracy (%)')
  ax.set_title('accuracy vs robustness (mean ± std over seeds)', fontsize=10)
  ax.grid(alpha=0.3)
  artifacts.write_bytes(out / 'accuracy_vs_robustness.png', _png(fig))

  fig = Figure(figsize=(6, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  puma = sorted(
    (s for s in summary if s['strategy'] == 'puma' and s['setting'] == f'puma_f{s["ratio"]:g}'),
    key=lambda s: s['ratio'],
  )
  for m, style in (('pgd_ce_acc', 'o-'), ('pgd_cw_acc', 's-'), ('worst_case_acc', '^-')):
    if puma:
      ax.errorbar(
        [100 * s['ratio'] for s in puma],
        [s[f'{m}_mean'] for s in puma],
        yerr=[s[f'{m}_std'] or 0.0 for s in puma],
        fmt=style,
        capsize=2,
        label=f'PUMA, {METRIC_LABELS[m]}',
      )
  base = next((s for s in summary if s['setting'] == baseline), None)
  if base is not None:
    ax.axhline(base['worst_case_acc_mean'], color='black', ls='--', label='AT, PGD worst')
  ax.set_xlabel('pruning ratio (% of the generated pool dropped)')
  ax.set_ylabel('robust accuracy (%)')
  ax.set_title('robust accuracy against pruning ratio', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  artifacts.write_bytes(out / 'robust_vs_ratio.png', _png(fig))
