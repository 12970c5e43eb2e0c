"""The run report: `WORKDIR/report.md`, `report.json` and PNG plots from the stages' outputs.

Reads only what the stages wrote (margin summary, pruning statistics and
`kept.npz`, training metrics, evaluation report), so it is cheap and can be
rerun at any time.
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from puma_jax import artifacts, tables
from puma_jax.metric_writer import read_metrics

SOURCES = ('real', 'generated')


def _read_json(path: Path) -> dict[str, Any] | None:
  return json.loads(path.read_text(encoding='utf-8')) if path.exists() else None


def _save(fig: Figure, path: Path) -> Path:
  FigureCanvasAgg(fig)
  tmp = path.with_name(f'.{path.name}.tmp.png')
  fig.savefig(tmp, dpi=110, bbox_inches='tight')
  tmp.replace(path)
  return path


def plot_eps_distribution(kept_npz: Path, eps: float, path: Path) -> Path | None:
  """Histogram of the per-example training radii by source."""
  if not kept_npz.exists():
    return None
  with np.load(kept_npz) as f:
    eps_by_source = {s: f[f'eps_{s}'] for s in SOURCES if f'eps_{s}' in f.files}
  fig = Figure(figsize=(6, 3.5))
  ax = fig.add_subplot()
  bins = np.linspace(-eps * 1.05, eps * 1.05, 43)
  for source, values in eps_by_source.items():
    if len(values):
      ax.hist(
        np.clip(values, bins[0], bins[-1]), bins=bins, alpha=0.6, label=f'{source} ({len(values)})'
      )
  ax.axvline(eps, color='k', lw=0.8, ls='--')
  ax.set_xlabel('training radius eps_i')
  ax.set_ylabel('examples')
  ax.set_yscale('log')
  ax.set_title('Per-example attack radius of the kept examples')
  ax.legend()
  return _save(fig, path)


def training_curves(metrics_path: Path) -> dict[str, list[float]]:
  """Steps and EMA test accuracies (clean, PGD) logged during training."""
  curves = {'step': [], 'clean_accuracy': [], 'pgd_accuracy': []}
  if not metrics_path.exists():
    return curves
  for row in read_metrics(metrics_path, merge=True):
    if 'eval/clean_accuracy' in row:
      curves['step'].append(row['step'])
      curves['clean_accuracy'].append(row['eval/clean_accuracy'])
      curves['pgd_accuracy'].append(row['eval/pgd_accuracy'])
  return curves


def plot_training_curves(
  runs: Mapping[str, Mapping[str, Sequence[float]]], path: Path
) -> Path | None:
  """The `training_curves` of one or more runs, a colour per run: clean solid, PGD dashed.

  `runs` maps a legend label ('' for a lone run) to its curves; None when none has a point.
  """
  runs = {label: c for label, c in runs.items() if c['step']}
  if not runs:
    return None
  fig = Figure(figsize=(6, 3.5))
  ax = fig.add_subplot()
  for i, (label, c) in enumerate(runs.items()):
    for key, style, name in (('clean_accuracy', 'o-', 'clean'), ('pgd_accuracy', 's--', 'PGD')):
      legend = f'{label}: {name}' if label else name
      ax.plot(c['step'], c[key], style, color=f'C{i}', markersize=4, label=legend)
  ax.set_xlabel('training step')
  ax.set_ylabel('test accuracy (EMA weights)')
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7 if len(runs) > 1 else None, loc='lower right')
  return _save(fig, path)


def _pct(x: float | None) -> str:
  """A fraction in [0, 1] as a percentage."""
  return '-' if x is None else f'{100 * x:.2f}%'


def _percent(x: float | None) -> str:
  """A value already in percent (the evaluation report's convention, as RobustBench's)."""
  return '-' if x is None else f'{x:.2f}%'


def _estimator(m: dict[str, Any]) -> str:
  """The margin estimator and its settings, in words (config.json's `margins`)."""
  name = m.get('estimator', 'deepfool')
  text = f'estimator `{name}`, {m["norm"]}, {m["num_candidates"]} candidates'
  if name == 'deepfool':
    return text + f', at most {m["max_iter"]} iterations'
  if name == 'fab':
    fab = m.get('fab', {})
    return text + f', {fab.get("restarts")} restarts of {fab.get("num_steps")} steps'
  return text


def _markdown(rep: dict[str, Any], plots: dict[str, str]) -> str:
  cfg = rep['settings']
  lines = [
    '# PUMA run report',
    '',
    f'Workdir `{rep["workdir"]}`.',
    '',
    '## Settings',
    '',
    f'- model `{cfg["model"]["name"]}` ({cfg["model"]["dtype"]}), {cfg["model"]["num_classes"]} classes',
    f'- threat model: {cfg["attack"]["norm"]}, eps {cfg["attack"]["eps"]:.5g}; training loss '
    f'`{cfg["train"]["loss"]}`, {cfg["attack"]["num_steps"]} attack steps',
    f'- pruning: strategy `{cfg["prune"]["strategy"]}`, fraction {cfg["prune"]["fraction"]}, '
    f'scope `{cfg["prune"]["scope"]}`, eps rule `{cfg["prune"]["eps_rule"]}`, unconverged '
    f'margins `{cfg["prune"].get("unconverged", "keep_distance")}`',
    f'- margins: {_estimator(cfg["margins"])}; margin model from `{cfg["margin_model"]["source"]}`',
    f'- training: {cfg["train"]["num_steps"]} steps of batch {cfg["train"]["batch_size"]}, '
    f'{cfg["data"]["generated_fraction"]:.0%} generated per batch',
    '',
  ]
  margins = rep.get('margins')
  if margins:
    rows = []
    for source, s in margins.items():
      median = (s.get('quantiles') or {}).get('0.5')
      rows.append(
        [
          source,
          s['count'],
          median if median is None else f'{median:.4g}',
          _pct(s.get('fraction_negative')),
          _pct(s.get('fraction_not_converged')),
        ]
      )
    columns = ['source', 'examples', 'median margin', 'negative', 'not converged']
    lines += ['## Margins', '', tables.markdown_table(columns, rows), '']
  prune = rep.get('pruning')
  if prune:
    rows = []
    for source, kept in prune['kept'].items():
      e = prune['eps'].get(source, {})
      counts = [e.get(k, '-') for k in ('reduced', 'negative', 'zero', 'full')]
      rows.append([source, kept, prune['pruned'].get(source, 0), *counts])
    columns = ['source', 'kept', 'pruned', 'eps reduced', 'eps negative', 'eps zero', 'eps full']
    lines += ['## Pruning', '', tables.markdown_table(columns, rows), '']
    unconverged = prune.get('unconverged')
    if unconverged:
      counts = ', '.join(f'{s} {n}' for s, n in unconverged['count'].items())
      excluded = sum(unconverged['excluded'].values())
      lines += [
        f'Margins that did not converge: {counts} (rule `{unconverged["rule"]}`'
        + (f', {excluded} excluded' if excluded else '')
        + ').',
        '',
      ]
    for source, per_class in prune.get('kept_per_class', {}).items():
      if len(per_class) <= 20:
        lines.append(f'Kept per class ({source}): {per_class}')
    lines.append('')
  ev = rep.get('evaluation')
  if ev:
    lines += [
      '## Evaluation (EMA weights, test split)',
      '',
      'PGD rows are separate attacks; the AutoAttack rows are cumulative (each attack runs '
      'on the examples still robust), and the worst case counts an example robust only if '
      'every attack failed on it.',
      '',
      tables.markdown_table(
        ['stage', 'accuracy'], [[k, _percent(v)] for k, v in ev.get('accuracies', {}).items()]
      ),
      '',
      f'{ev.get("n_examples", "?")} test examples.',
      '',
    ]
  if plots:
    lines += ['## Plots', '']
    for title, path in plots.items():
      lines.append(f'![{title}]({path})')
    lines.append('')
  return '\n'.join(lines)


def _evaluation_summary(ev: dict[str, Any] | None) -> dict[str, Any] | None:
  if ev is None:
    return None
  accuracies = {'clean': ev.get('clean_acc')}
  after = ev.get('accuracy_after_each_attack', {})
  # PGD first, then AutoAttack's attacks in the order they run (the JSON keys are sorted).
  order = ('pgd_ce', 'pgd_cw', 'apgd-ce', 'apgd-t', 'fab-t', 'square')
  for key in sorted(after, key=lambda k: (order.index(k) if k in order else len(order), k)):
    accuracies[_ATTACK_LABELS.get(key, key)] = after[key]
  accuracies['AutoAttack'] = ev.get('autoattack_acc')
  accuracies['worst case over all attacks'] = ev.get('worst_case_acc')
  return {
    'accuracies': {k: v for k, v in accuracies.items() if v is not None},
    'n_examples': ev.get('n_examples'),
  }


_ATTACK_LABELS = {
  'pgd_ce': 'PGD (cross-entropy)',
  'pgd_cw': 'PGD (CW margin loss)',
  'apgd-ce': 'AutoAttack: after APGD-CE',
  'apgd-t': 'AutoAttack: after APGD-T',
  'fab-t': 'AutoAttack: after FAB-T',
  'square': 'AutoAttack: after Square',
}


def write_report(config: Any, workdir: str | Path) -> dict[str, Path]:
  """Writes `report.md`, `report.json` and the plots into `workdir`; returns their paths."""
  workdir = Path(workdir)
  margin_summary = _read_json(workdir / 'margins' / 'summary.json')
  prune = _read_json(workdir / 'prune' / 'prune.json')
  evaluation = _read_json(workdir / 'evaluate' / 'report.json')
  curves = training_curves(workdir / 'train' / 'metrics.jsonl')

  plots: dict[str, str] = {}
  histogram = workdir / 'margins' / 'margins_by_source.png'
  if histogram.exists():
    plots['Margins by source'] = str(histogram.relative_to(workdir))
  eps_plot = plot_eps_distribution(
    workdir / 'prune' / 'kept.npz', float(config.attack.eps), workdir / 'eps_distribution.png'
  )
  if eps_plot:
    plots['Per-example eps'] = eps_plot.name
  curve_plot = plot_training_curves({'': curves}, workdir / 'training_curves.png')
  if curve_plot:
    plots['Accuracy and robustness over training'] = curve_plot.name

  rep = {
    'workdir': str(workdir),
    'settings': artifacts.canonical(config),
    'margin_estimator': (margin_summary or {}).get('estimator'),
    'margins': (margin_summary or {}).get('by_source'),
    'pruning': (prune or {}).get('stats'),
    'training_curves': curves,
    'evaluation': _evaluation_summary(evaluation),
    'evaluation_report': evaluation,
    'plots': plots,
  }
  artifacts.write_json(workdir / 'report.json', rep)
  artifacts.write_text(workdir / 'report.md', _markdown(rep, plots))
  return {'report.md': workdir / 'report.md', 'report.json': workdir / 'report.json'}
