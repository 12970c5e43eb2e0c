r"""Pruning sweep: none / random / prune_high / prune_low / puma at several fractions and seeds.

Every run is the main job (`puma_jax.pipeline`) on the embedded default
(`configs/default.py`: real + generated MNIST digits, SmallCNN, TRADES, L-infinity
eps 0.3) with one pruning setting, a shorter training and a smaller evaluation.
To stay affordable on a CPU the runs share everything that does not depend on
the pruning setting:

- one data directory, `<out>/data`, built once;
- ONE margin model and ONE margin computation: the default pipeline's
  prepare, margin_model and margins stages run once in `<out>/base`; every run
  then loads that margin model (`margin_model.source=checkpoint`) and finds the
  margin sidecars already complete beside the shards of `<out>/data`, so its
  margins stage only checks and loads them. The sweep verifies this after every
  run (the sidecar files are unchanged and the run's margin-model fingerprint is
  the base's) and stops if margins were recomputed;
- each run (`<out>/runs/<strategy>_f<fraction>_s<seed>`) does only prune, train,
  evaluate (clean, PGD-20 with CE and CW losses, AutoAttack standard) and report.

Rerunning the same command skips finished runs and stages (the pipeline's stage
markers), resumes an interrupted one from its last checkpoint, and refuses an
`--out` made with other settings. `seed` sets the random pruning, the model's
initialisation and the data order of each run (the margin model is the same).

  python -m experiments.pruning_sweep --out=/tmp/pruning_sweep

writes into --out: `runs.csv` (one row per run), `summary.csv` and `table.md`
(mean and standard deviation over seeds), `accuracy_vs_robustness.png` and
`sweep.json` (the settings, the base stages' timings, the command), and prints
the table. `--tiny` runs the same sweep on the `:tiny` config in seconds (tests).
"""

import argparse
import copy
import csv
import dataclasses
import io
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from puma_jax import logs  # absl only: JAX starts later

STRATEGIES = ('none', 'random', 'prune_high', 'prune_low', 'puma')
STRATEGY_LABELS = {
  'none': 'no pruning',
  'random': 'random',
  'prune_high': 'prune_high (drop easy)',
  'prune_low': 'prune_low (drop hard)',
  'puma': 'PUMA (drop easy, eps_i from margin)',
}
_COLORS = {
  'none': 'black',
  'random': 'tab:gray',
  'prune_high': 'tab:red',
  'prune_low': 'tab:blue',
  'puma': 'tab:green',
}
BASE_STAGES = ('prepare', 'margin_model', 'margins')
RUN_STAGES = ('prepare', 'margin_model', 'margins', 'prune', 'train', 'evaluate', 'report')
# Accuracies (percent) taken from each run's evaluation report.
METRICS = ('clean_acc', 'pgd_ce_acc', 'pgd_cw_acc', 'autoattack_acc', 'worst_case_acc')
METRIC_LABELS = {
  'clean_acc': 'clean',
  'pgd_ce_acc': 'PGD-CE',
  'pgd_cw_acc': 'PGD-CW',
  'autoattack_acc': 'AutoAttack',
  'worst_case_acc': 'worst case',
}
SWEEP_STATE = 'sweep_run.json'  # per run: measured stage times (kept across reruns)
AUTOATTACK_CHUNK = 16  # rows of still-robust examples AutoAttack attacks together
TINY_FRACTIONS = (0.5,)
TINY_SEEDS = (0,)


@dataclasses.dataclass(frozen=True)
class Settings:
  """One sweep; validated on construction (errors name the flag).

  Attributes:
    out: folder for everything (--out).
    strategies: subset of `STRATEGIES` (--strategies); 'none' runs once per seed.
    fractions: shares of the generated pool dropped, each in (0, 1) (--fractions).
    seeds: the runs' `config.seed` values (--seeds).
    train_steps: training steps of every run (--train_steps).
    eval_examples: test examples evaluated, 0 for all (--eval_examples).
    tiny: use the `:tiny` config (seconds per run; --tiny).
  """

  out: Path
  strategies: tuple[str, ...] = STRATEGIES
  fractions: tuple[float, ...] = (0.3, 0.6, 0.9)
  seeds: tuple[int, ...] = (0, 1)
  train_steps: int = 400
  eval_examples: int = 250
  tiny: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'out', Path(self.out).expanduser())
    object.__setattr__(self, 'strategies', tuple(self.strategies))
    object.__setattr__(self, 'fractions', tuple(float(f) for f in self.fractions))
    object.__setattr__(self, 'seeds', tuple(int(s) for s in self.seeds))
    unknown = [s for s in self.strategies if s not in STRATEGIES]
    if unknown or not self.strategies:
      raise ValueError(
        f'--strategies: unknown {unknown} (or none given); use a comma-separated subset of '
        f'{",".join(STRATEGIES)}'
      )
    if len(set(self.strategies)) != len(self.strategies):
      raise ValueError(f'--strategies lists a strategy twice: {",".join(self.strategies)}')
    pruned = [s for s in self.strategies if s != 'none']
    if pruned and not self.fractions:
      raise ValueError('--fractions: give at least one fraction (e.g. --fractions=0.3,0.6)')
    bad = [f for f in self.fractions if not (math.isfinite(f) and 0.0 < f < 1.0)]
    if bad:
      raise ValueError(
        f'--fractions: {bad} outside (0, 1); each is the share of the generated pool dropped '
        '(the unpruned baseline is --strategies=none)'
      )
    if len(set(self.fractions)) != len(self.fractions):
      raise ValueError(f'--fractions lists a fraction twice: {self.fractions}')
    if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
      raise ValueError(f'--seeds: give distinct integers >= 0, got {self.seeds}')
    if self.train_steps < 1:
      raise ValueError(f'--train_steps must be >= 1, got {self.train_steps}')
    if self.eval_examples < 0:
      raise ValueError(
        f'--eval_examples must be >= 0 (0: the whole test split), got {self.eval_examples}'
      )

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['out'] = str(self.out)
    return d


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the sweep."""

  strategy: str
  fraction: float  # 0.0 for 'none'
  seed: int

  @property
  def name(self) -> str:
    if self.strategy == 'none':
      return f'none_s{self.seed}'
    return f'{self.strategy}_f{self.fraction:g}_s{self.seed}'


def plan(settings: Settings) -> list[Run]:
  """The runs, seed by seed (so a partial sweep has whole seeds first)."""
  runs = []
  for seed in settings.seeds:
    for strategy in settings.strategies:
      fractions = (0.0,) if strategy == 'none' else settings.fractions
      runs.extend(Run(strategy, f, seed) for f in fractions)
  return runs


# ----------------------------------------------------------------------------- configs


def default_config(tiny: bool) -> Any:
  """configs/default.py (its `:tiny` variant with `tiny`)."""
  from configs import default  # noqa: PLC0415 (the repository's configs/ folder)

  return default.get_config('tiny' if tiny else None)


def base_config(settings: Settings) -> Any:
  """The default pipeline whose data, margin model and margins every run shares."""
  config = default_config(settings.tiny)
  config.data.data_dir = str(settings.out / 'data')
  return config


def run_config(settings: Settings, run: Run) -> Any:
  """A run's config: the base's data and margin model, its pruning, seed and budget."""
  config = copy.deepcopy(base_config(settings))
  config.seed = run.seed
  config.prune.strategy = run.strategy
  config.prune.fraction = run.fraction
  config.margin_model.source = 'checkpoint'
  config.margin_model.path = str(base_dir(settings) / 'margin_model')
  # The default's learning-rate schedule, shrunk to the run's length (the same share of warm-up).
  default_steps, train = config.train.num_steps, config.train
  train.warmup_steps = round(train.warmup_steps * settings.train_steps / default_steps)
  train.num_steps = settings.train_steps
  config.train.eval_every_steps = settings.train_steps  # one evaluation, at the end
  config.train.checkpoint_every_steps = min(
    config.train.checkpoint_every_steps, settings.train_steps
  )
  config.eval.num_examples = settings.eval_examples
  if not config.eval.autoattack_chunk_size:
    # AutoAttack then attacks only the chunks that hold still-robust rows instead of the
    # whole batch. The flags are the same (every example has its own key); on the default
    # at 27% robust accuracy it took 3.1x less CPU time (chunks of 16; 2.7x with 32).
    config.eval.autoattack_chunk_size = AUTOATTACK_CHUNK
  return config


def base_dir(settings: Settings) -> Path:
  return settings.out / 'base'


def run_dir(settings: Settings, run: Run) -> Path:
  return settings.out / 'runs' / run.name


# ----------------------------------------------------------------------------- running


def _run_stages(config: Any, workdir: Path, names: Sequence[str], out: Path) -> dict[str, Any]:
  """Runs the pipeline stage by stage in `workdir`; returns the times of the stages that ran.

  Wall and CPU seconds (`time.process_time`: all threads of this process) per
  stage; CPU time is the steadier measure on a machine shared with other jobs.
  """
  from puma_jax import pipeline, stages  # noqa: PLC0415 (JAX starts here, not at import)

  ran: dict[str, Any] = {}
  for name in names:
    marker = pipeline.STAGE_DEFS[name].directory(workdir) / stages.MARKER
    existed = marker.exists()
    resumed = not existed and pipeline.STAGE_DEFS[name].directory(workdir).exists()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
      pipeline.run(config, workdir, stage=name)
    except stages.ConfigMismatchError as e:
      raise stages.ConfigMismatchError(
        f'{e}\n{out} holds a sweep made with other settings: rerun with the flags it was made '
        f'with (see {out / "sweep.json"}), or use another --out.'
      ) from e
    if not existed and marker.exists():
      ran[name] = {
        'seconds': round(time.perf_counter() - start, 2),
        'cpu_seconds': round(time.process_time() - cpu_start, 2),
        'resumed': resumed,
      }
  return ran


def _stage_outputs(workdir: Path, name: str) -> dict[str, Any]:
  from puma_jax import artifacts, stages  # noqa: PLC0415

  path = workdir / name / stages.MARKER
  return artifacts.read_json(path).get('outputs', {}) if path.exists() else {}


def margin_files(data_dir: Path) -> dict[str, tuple[int, int, int]]:
  """(inode, mtime_ns, size) of every margin sidecar and manifest under `data_dir`."""
  out = {}
  for path in sorted(data_dir.rglob('*.margins*')):
    st = path.stat()
    out[str(path.relative_to(data_dir))] = (st.st_ino, st.st_mtime_ns, st.st_size)
  return out


def _load_state(path: Path) -> dict[str, Any]:
  from puma_jax import artifacts  # noqa: PLC0415

  return artifacts.read_json(path) if path.exists() else {}


def _save_state(path: Path, state: dict[str, Any]) -> None:
  from puma_jax import artifacts  # noqa: PLC0415

  artifacts.write_json(path, state)


def run_base(settings: Settings) -> dict[str, Any]:
  """Prepare, margin model and margins once in `<out>/base`; returns what the runs check."""
  workdir = base_dir(settings)
  state_path = workdir / SWEEP_STATE
  state = _load_state(state_path)
  logging.info('sweep: base stages (data, margin model, margins) in %s', workdir)
  ran = _run_stages(base_config(settings), workdir, BASE_STAGES, settings.out)
  _record(state, ran)
  _save_state(state_path, state)
  outputs = _stage_outputs(workdir, 'margins')
  files = margin_files(settings.out / 'data')
  if not files:
    raise RuntimeError(f'the base margins stage left no margin sidecars under {settings.out}/data')
  return {
    'model_fingerprint': outputs['model_fingerprint'],
    'examples': outputs['examples'],
    'not_converged': outputs['not_converged'],
    'stage_seconds': state['stage_seconds'],
    'stage_cpu_seconds': state['stage_cpu_seconds'],
    'margin_files': files,
  }


def run_one(settings: Settings, run: Run, base: Mapping[str, Any]) -> dict[str, Any]:
  """One run of the sweep (skipped stage by stage when already done); returns its table row."""
  from puma_jax import artifacts, pruning  # noqa: PLC0415

  workdir = run_dir(settings, run)
  config = run_config(settings, run)
  state_path = workdir / SWEEP_STATE
  state = _load_state(state_path)
  ran = _run_stages(config, workdir, RUN_STAGES, settings.out)
  _record(state, ran)
  _save_state(state_path, state)
  seconds, cpu = state['stage_seconds'], state['stage_cpu_seconds']

  uses_margins = pruning.settings_from_config(config).needs_margins
  if uses_margins:
    _check_margins_reused(settings, run, workdir, base)
  ev = artifacts.read_json(workdir / 'evaluate' / 'report.json')
  prune = pruning.PruneResult.load(workdir / 'prune')
  eps = np.concatenate([prune.eps[s] for s in prune.eps])
  kept = {s: int(len(prune.kept.get(s, ()))) for s in ('real', 'generated')}
  row = {
    'run': run.name,
    'strategy': run.strategy,
    'fraction': run.fraction,
    'seed': run.seed,
    'kept_real': kept['real'],
    'kept_generated': kept['generated'],
    'kept_total': kept['real'] + kept['generated'],
    'eps_reduced': int((eps < np.float32(config.attack.eps)).sum()),
    'eps_negative': int((eps < 0).sum()),
    **{m: ev[m] for m in METRICS},
    'eval_examples': ev['n_examples'],
    'margins_reused': uses_margins,
  }
  for name in RUN_STAGES:
    row[f'{name}_s'] = seconds.get(name)
  row['total_s'] = round(sum(seconds.values()), 2)
  row['train_cpu_s'] = cpu.get('train')
  row['evaluate_cpu_s'] = cpu.get('evaluate')
  row['total_cpu_s'] = round(sum(cpu.values()), 2)
  row['resumed_stages'] = ' '.join(state.get('resumed', []))
  return row


def _record(state: dict[str, Any], ran: Mapping[str, Mapping[str, Any]]) -> None:
  """Adds the times of the stages that ran to a run's saved state (kept across reruns)."""
  state.setdefault('stage_seconds', {}).update({k: v['seconds'] for k, v in ran.items()})
  state.setdefault('stage_cpu_seconds', {}).update({k: v['cpu_seconds'] for k, v in ran.items()})
  resumed = {k for k, v in ran.items() if v['resumed']}
  if resumed:
    state['resumed'] = sorted(set(state.get('resumed', [])) | resumed)


def _check_margins_reused(
  settings: Settings, run: Run, workdir: Path, base: Mapping[str, Any]
) -> None:
  """Stops the sweep if a run computed margins itself instead of reusing the base's."""
  fp = _stage_outputs(workdir, 'margins').get('model_fingerprint')
  if fp != base['model_fingerprint']:
    raise RuntimeError(
      f'run {run.name}: its margins come from margin model {fp}, not the base margin model '
      f'{base["model_fingerprint"]} in {base_dir(settings)}; delete {workdir} and rerun.'
    )
  now = margin_files(settings.out / 'data')
  if now != base['margin_files']:
    changed = sorted(
      k for k in set(now) | set(base['margin_files']) if now.get(k) != base['margin_files'].get(k)
    )
    raise RuntimeError(
      f'run {run.name} rewrote margin sidecars it should have reused: {changed[:4]} '
      f'({len(changed)} files under {settings.out / "data"})'
    )
  if (workdir / 'margin_model' / 'checkpoints').exists():
    raise RuntimeError(f'run {run.name} trained a margin model of its own in {workdir}')


def run_sweep(
  settings: Settings,
  *,
  on_row: Callable[[Mapping[str, Any], list[dict[str, Any]]], Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The base stages, then every run; `on_row(base, rows)` after each run (partial tables)."""
  settings.out.mkdir(parents=True, exist_ok=True)
  base = run_base(settings)
  runs = plan(settings)
  rows = []
  for i, run in enumerate(runs):
    logging.info('sweep: run %d/%d %s', i + 1, len(runs), run.name)
    rows.append(run_one(settings, run, base))
    if on_row is not None:
      on_row(base, rows)
  return base, rows


# ----------------------------------------------------------------------------- tables


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Mean and standard deviation (over seeds) per strategy and fraction, in sweep order."""
  groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r['strategy'], r['fraction']), []).append(r)
  out = []
  for (strategy, fraction), rs in groups.items():
    s = {
      'strategy': strategy,
      'fraction': fraction,
      'seeds': len(rs),
      'kept_real': _mean([r['kept_real'] for r in rs]),
      'kept_generated': _mean([r['kept_generated'] for r in rs]),
      'kept_total': _mean([r['kept_total'] for r in rs]),
    }
    for m in METRICS:
      values = [r[m] for r in rs if r[m] is not None]
      s[f'{m}_mean'] = _mean(values)
      s[f'{m}_std'] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    s['train_s_mean'] = _mean([r['train_s'] for r in rs if r['train_s'] is not None])
    s['evaluate_s_mean'] = _mean([r['evaluate_s'] for r in rs if r['evaluate_s'] is not None])
    out.append(s)
  return out


def _mean(values: Sequence[float]) -> float | None:
  return float(np.mean(values)) if len(values) else None


def _cell(s: Mapping[str, Any], metric: str) -> str:
  mean, std = s[f'{metric}_mean'], s[f'{metric}_std']
  if mean is None:
    return '-'
  return f'{mean:.1f}' if std is None else f'{mean:.1f} ± {std:.1f}'


def format_table(summary: Sequence[Mapping[str, Any]], *, pgd_steps: int) -> str:
  """The markdown table: one row per strategy and fraction, accuracies in percent."""
  lines = [
    '| strategy | dropped | training examples (real + generated) | clean | '
    f'PGD-{pgd_steps} | AutoAttack | worst case |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for s in summary:
    kept = f'{s["kept_total"]:,.0f} ({s["kept_real"]:,.0f} + {s["kept_generated"]:,.0f})'
    lines.append(
      f'| {STRATEGY_LABELS[s["strategy"]]} | {s["fraction"]:g} | {kept} | '
      f'{_cell(s, "clean_acc")} | {_cell(s, "pgd_ce_acc")} | {_cell(s, "autoattack_acc")} | '
      f'{_cell(s, "worst_case_acc")} |'
    )
  return '\n'.join(lines)


def report(
  settings: Settings,
  base: Mapping[str, Any],
  rows: Sequence[Mapping[str, Any]],
  *,
  command: str,
  seconds: float,
) -> str:
  """`table.md`: what was run, the summary table and the measured times."""
  config = run_config(settings, plan(settings)[0])
  summary = summarise(rows)
  seeds = sorted({r['seed'] for r in rows})
  base_s, base_cpu = base['stage_seconds'], base['stage_cpu_seconds']

  def mean(key: str) -> str:
    wall = [r[f'{key}_s'] for r in rows if r[f'{key}_s'] is not None]
    cpu = [r[f'{key}_cpu_s'] for r in rows if r[f'{key}_cpu_s'] is not None]
    return f'{np.mean(wall):.0f}' + (f' ({np.mean(cpu):.0f})' if cpu else '') if wall else '-'

  lines = [
    '# Pruning sweep on the embedded default',
    '',
    f'Command: `{command}`',
    '',
    f'{len(rows)} runs ({len(seeds)} seed(s): {", ".join(map(str, seeds))}); each trains '
    f'{config.train.num_steps} steps of batch {config.train.batch_size} '
    f'({config.data.generated_fraction:.0%} generated per batch, '
    f'{config.train.num_steps * config.train.batch_size:,} examples drawn) with '
    f'`{config.train.loss}`, {config.attack.norm} eps {config.attack.eps:g}, and is evaluated '
    f'on {rows[0]["eval_examples"] if rows else "?"} test examples (PGD-{config.eval.pgd_steps} '
    'with the CE loss, AutoAttack standard, worst case over all attacks incl. PGD-CW). '
    '"dropped" is the share of the generated pool removed; the real training data are all '
    'kept. One margin model and one margin computation '
    f'({base["examples"]:,} examples, {base["not_converged"]:,} not converged) serve every run.',
    '',
    'Accuracies in percent on the test split, mean ± standard deviation over seeds.',
    '',
    format_table(summary, pgd_steps=config.eval.pgd_steps),
    '',
    'Measured times, wall seconds (CPU seconds of the process, all threads): base stages '
    + ', '.join(
      f'{k} {base_s[k]:.0f} ({base_cpu.get(k, float("nan")):.0f})'
      for k in BASE_STAGES
      if k in base_s
    )
    + f'; per run (mean over the runs computed in this --out): train {mean("train")}, '
    f'evaluate {mean("evaluate")}, all stages {mean("total")}; this invocation {seconds:.0f}.',
    '',
  ]
  return '\n'.join(lines)


def _csv_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue().encode()


def plot(summary: Sequence[Mapping[str, Any]], settings: Settings, path: Path) -> None:
  """Clean vs AutoAttack accuracy per setting, and AutoAttack accuracy vs fraction dropped."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  from puma_jax import artifacts  # noqa: PLC0415

  fig = Figure(figsize=(11, 4.4))
  FigureCanvasAgg(fig)
  ax_tradeoff, ax_frac = fig.subplots(1, 2)
  for strategy in [s for s in STRATEGIES if any(r['strategy'] == s for r in summary)]:
    pts = [r for r in summary if r['strategy'] == strategy and r['autoattack_acc_mean'] is not None]
    if not pts:
      continue
    color = _COLORS[strategy]
    x = np.array([r['clean_acc_mean'] for r in pts])
    y = np.array([r['autoattack_acc_mean'] for r in pts])
    xerr = np.array([r['clean_acc_std'] or 0.0 for r in pts])
    yerr = np.array([r['autoattack_acc_std'] or 0.0 for r in pts])
    marker = '*' if strategy == 'none' else 'o'
    ax_tradeoff.errorbar(
      x,
      y,
      xerr=xerr,
      yerr=yerr,
      fmt=marker,
      color=color,
      ms=9 if marker == '*' else 6,
      capsize=2,
      label=STRATEGY_LABELS[strategy],
    )
    if strategy != 'none':
      for r, xi, yi in zip(pts, x, y, strict=True):
        ax_tradeoff.annotate(
          f'{r["fraction"]:g}',
          (xi, yi),
          textcoords='offset points',
          xytext=(4, 4),
          fontsize=7,
          color=color,
        )
      f = np.array([r['fraction'] for r in pts])
      ax_frac.errorbar(
        f, y, yerr=yerr, fmt='o-', color=color, capsize=2, label=STRATEGY_LABELS[strategy]
      )
    else:
      ax_frac.axhspan(y[0] - yerr[0], y[0] + yerr[0], color=color, alpha=0.1)
      ax_frac.axhline(y[0], color=color, ls='--', lw=1, label=STRATEGY_LABELS[strategy])
  ax_tradeoff.set_xlabel('clean accuracy (%)')
  ax_tradeoff.set_ylabel('AutoAttack accuracy (%)')
  ax_tradeoff.set_title('accuracy vs robustness (labels: fraction dropped)', fontsize=10)
  ax_tradeoff.grid(alpha=0.3)
  ax_tradeoff.legend(fontsize=7)
  ax_frac.set_xlabel('share of the generated pool dropped')
  ax_frac.set_ylabel('AutoAttack accuracy (%)')
  ax_frac.set_title('robustness vs pruning', fontsize=10)
  ax_frac.grid(alpha=0.3)
  ax_frac.legend(fontsize=7)
  seeds = len(settings.seeds)
  fig.suptitle(
    f'Pruning sweep on the embedded default: {settings.train_steps} training steps, '
    f'mean ± std over {seeds} seed(s)' + (' (tiny config)' if settings.tiny else ''),
    fontsize=10,
  )
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=120)
  artifacts.write_bytes(path, buf.getvalue())


def write_outputs(
  settings: Settings,
  base: Mapping[str, Any],
  rows: Sequence[Mapping[str, Any]],
  *,
  command: str,
  seconds: float,
) -> str:
  """Writes runs.csv, summary.csv, table.md, accuracy_vs_robustness.png, sweep.json."""
  from puma_jax import artifacts  # noqa: PLC0415

  out = settings.out
  text = report(settings, base, rows, command=command, seconds=seconds)
  summary = summarise(rows)
  artifacts.write_bytes(out / 'runs.csv', _csv_bytes(rows))
  artifacts.write_bytes(out / 'summary.csv', _csv_bytes(summary))
  artifacts.write_text(out / 'table.md', text)
  artifacts.write_json(
    out / 'sweep.json',
    {
      'settings': settings.to_dict(),
      'command': command,
      'runs': [r['run'] for r in rows],
      'base': {k: v for k, v in base.items() if k != 'margin_files'},
      'seconds_this_invocation': round(seconds, 1),
    },
  )
  plot(summary, settings, out / 'accuracy_vs_robustness.png')
  return text


# ----------------------------------------------------------------------------- command line


def _list(kind: Callable[[str], Any], flag: str) -> Callable[[str], tuple[Any, ...]]:
  def parse(text: str) -> tuple[Any, ...]:
    try:
      return tuple(kind(v.strip()) for v in text.split(',') if v.strip())
    except ValueError:
      raise argparse.ArgumentTypeError(
        f'{flag} takes a comma-separated list of {kind.__name__} values; got {text!r}'
      ) from None

  return parse


def _csv(values: Sequence[Any]) -> str:
  return ','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)


def parse_args(argv: Sequence[str]) -> Settings:
  """Settings from command-line arguments (errors name the flag)."""
  d = Settings(out=Path('.'))
  p = argparse.ArgumentParser(
    prog='python -m experiments.pruning_sweep',
    description='Pruning strategies x fractions x seeds on the embedded default pipeline.',
  )
  p.add_argument('--out', required=True, help='folder for everything; rerun to resume')
  p.add_argument(
    '--strategies',
    type=_list(str, '--strategies'),
    default=d.strategies,
    help=f'subset of {",".join(STRATEGIES)} (default: all)',
  )
  p.add_argument(
    '--fractions',
    type=_list(float, '--fractions'),
    default=None,
    help=f'shares of the generated pool dropped, in (0, 1) (default {_csv(d.fractions)}; '
    f'--tiny: {_csv(TINY_FRACTIONS)})',
  )
  p.add_argument(
    '--seeds',
    type=_list(int, '--seeds'),
    default=None,
    help=f'config.seed of the runs (default {_csv(d.seeds)}; --tiny: {_csv(TINY_SEEDS)})',
  )
  p.add_argument(
    '--train_steps',
    type=int,
    default=None,
    help=f"per run (default {d.train_steps}; --tiny: the tiny config's)",
  )
  p.add_argument(
    '--eval_examples',
    type=int,
    default=None,
    help=f"test examples evaluated, 0: all (default {d.eval_examples}; --tiny: the tiny config's)",
  )
  p.add_argument('--tiny', action='store_true', help='the :tiny config (seconds per run; tests)')
  a = p.parse_args(argv)
  # --tiny: the tiny config's budget and one fraction and seed, unless the flags say otherwise.
  tiny = default_config(True) if a.tiny else None

  def pick(value: Any, default: Any, tiny_default: Any) -> Any:
    return value if value is not None else (tiny_default if a.tiny else default)

  fractions = pick(a.fractions, d.fractions, TINY_FRACTIONS)
  seeds = pick(a.seeds, d.seeds, TINY_SEEDS)
  train_steps = pick(a.train_steps, d.train_steps, tiny and tiny.train.num_steps)
  eval_examples = pick(a.eval_examples, d.eval_examples, tiny and tiny.eval.num_examples)
  try:
    return Settings(
      out=Path(a.out),
      strategies=a.strategies,
      fractions=fractions,
      seeds=seeds,
      train_steps=train_steps,
      eval_examples=eval_examples,
      tiny=a.tiny,
    )
  except ValueError as e:
    p.error(str(e))


def _setup(settings: Settings) -> None:
  import jax  # noqa: PLC0415

  logs.setup_script_logging()
  # Every run compiles the same train, evaluation and AutoAttack programs; XLA's
  # persistent cache compiles each once for the whole sweep (unless a cache is set).
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', str(settings.out / 'compilation_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def main(argv: Sequence[str] | None = None) -> str:
  argv = list(sys.argv[1:] if argv is None else argv)
  settings = parse_args(argv)
  _setup(settings)
  command = 'python -m experiments.pruning_sweep ' + ' '.join(argv)
  start = time.perf_counter()

  def write(base: Mapping[str, Any], rows: list[dict[str, Any]]) -> str:
    return write_outputs(settings, base, rows, command=command, seconds=time.perf_counter() - start)

  base, rows = run_sweep(settings, on_row=write)
  text = write(base, rows)
  print(text)  # noqa: T201
  print(  # noqa: T201
    f'wrote {settings.out}/{{runs.csv,summary.csv,table.md,accuracy_vs_robustness.png,sweep.json}}'
    f' in {time.perf_counter() - start:.0f}s'
  )
  return text


if __name__ == '__main__':
  main()
