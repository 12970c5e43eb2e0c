r"""The PUMA study on the embedded default, from one command.

  python -m experiments.study --workdir=/tmp/puma_study [--tiny]

A study is a grid of settings (config overrides of `configs/default.py`) times
seeds, and a thin launcher: every run is the main job, `pipeline.run(config,
run_dir)`, so it is resumable by the pipeline's own stage markers and refuses a
workdir made with other settings. The runs share what does not depend on their
setting: one data directory (`<workdir>/data`, margin sidecars beside the
shards) and one margin model, trained once by the pipeline in `<workdir>/base`
and loaded by every run (`margin_model.source=checkpoint`), so a run's margins
stage finds the sidecars complete and only loads them.

The grid (`grid()`; every run trains the same number of steps and is evaluated
on all 1,000 test digits: clean, PGD-20 with the CE and the CW loss):

- `at`: standard adversarial training (prune.strategy none: no pruning, eps
  constant) against `puma_f0` (PUMA at pruning ratio 0: every example kept,
  eps_i from its margin);
- PUMA at pruning ratios 0, 10, 20, 30, 40 and 50% of the generated pool;
- at 30%: PUMA against random, prune_low (drop the lowest margins) and
  prune_high (drop the highest), both with a constant eps;
- at 30%: the margin estimators (deepfool, first_order, fab) with and without
  refreshed margins. These arms need `c.margins.estimator` and the refresh
  option (`REFRESH_FIELD`); where the config has no such field the arm is
  listed as not available and skipped, and it runs once the field exists.

Then AutoAttack (standard) evaluates every seed of the baseline `at` and of
the best PUMA setting (highest mean worst-case PGD accuracy), with the
library's evaluator, into `<run>/autoattack/` (resumable batch by batch).

The report, read from each run's `report.json` (the pipeline's report stage):
`runs.csv` (one row per run), `summary.csv` and `summary.md` (mean ± std over
seeds; which differences lie within the seed spread), `accuracy_vs_robustness.png`,
`robust_vs_ratio.png` and `baseline_curve.png` (the training curves of the
baseline and of the baseline at twice the steps, from their metrics.jsonl), all
in the study workdir. `--tiny` runs a few settings
on the `:tiny` config with one seed (tests).
"""

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import logging

from experiments import study_report
from experiments.study_report import METRICS
from puma_jax import logs  # no JAX: it starts later

SEEDS = (0, 1, 2)
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
COMPARE_RATIO = 0.3
# Long enough for the unpruned baseline's robust accuracy to level off, as `LONG_BASELINE`
# checks (at 800 steps it had not: twice the steps gained 11.6 points of PGD worst-case
# accuracy, docs/experiments.md); chosen with the time estimate there.
TRAIN_STEPS = 1200
CURVE_POINTS = 8  # train-time evaluations of the baseline (the others evaluate once, at the end)
ESTIMATORS = ('deepfool', 'first_order', 'fab')
ESTIMATOR_FIELD = 'margins.estimator'
# The refresh option of the margins (issue 15, point 2): recompute the kept examples' margins
# with the model being trained every N steps. The refreshed arms refresh once, halfway
# (N = half the run's steps; never after the last step). A DeepFool refresh of the kept set
# costs about a whole run's training; a FAB refresh about ten (docs/margin_estimators.md), so
# the fab-with-refresh arm runs only with --with_fab_refresh (it alone would double the study).
REFRESH_FIELD = 'train.refresh_margins_every'
OPTIONAL_SETTINGS = ('puma_f0.3_fab_refresh',)
# AutoAttack standard on the first N test digits of the selected runs (0: all 1,000): 500
# keeps the study within about 2.5 hours on 2 CPU cores (docs/experiments.md).
AUTOATTACK_EXAMPLES = 500
TINY_SETTINGS = ('at', 'puma_f0', 'puma_f0.3', 'prune_low_f0.3', 'puma_f0.3_first_order')
BASELINE = 'at'
# The baseline at twice the steps (the same schedule, stretched): whether `TRAIN_STEPS` is
# long enough, checked rather than assumed. Its first seed also logs its curve.
LONG_BASELINE = 'at_2x'
CURVE_SETTINGS = (BASELINE, LONG_BASELINE)  # their first seed logs a training curve


@dataclasses.dataclass(frozen=True)
class Setting:
  """One entry of the grid: config overrides, run for every seed.

  Attributes:
    name: folder name under `<workdir>/runs/` (with `_s<seed>`).
    label: what the tables call it.
    overrides: dotted config field -> value.
    requires: config fields that must exist for the setting to run.
    steps_factor: trains this many times the study's steps (the schedule stretched).
    refresh: refreshes the margins once, halfway through training (`REFRESH_FIELD`).
  """

  name: str
  label: str
  overrides: Mapping[str, Any]
  requires: tuple[str, ...] = ()
  steps_factor: int = 1
  refresh: bool = False

  @property
  def strategy(self) -> str:
    return self.overrides['prune.strategy']

  @property
  def ratio(self) -> float:
    return float(self.overrides['prune.fraction'])


def _puma(ratio: float, **extra: Any) -> dict[str, Any]:
  return {'prune.strategy': 'puma', 'prune.fraction': ratio, **extra}


def grid() -> list[Setting]:
  """Every setting of the study, in report order."""
  c = COMPARE_RATIO
  no_pruning = {'prune.strategy': 'none', 'prune.fraction': 0.0}
  out = [
    Setting(BASELINE, 'adversarial training (no pruning, constant eps)', no_pruning),
    Setting(LONG_BASELINE, 'adversarial training, twice the steps', no_pruning, steps_factor=2),
  ]
  out += [Setting(f'puma_f{r:g}', f'PUMA {r:.0%}', _puma(r)) for r in RATIOS]
  for strategy in ('random', 'prune_low', 'prune_high'):
    overrides = {'prune.strategy': strategy, 'prune.fraction': c}
    out.append(Setting(f'{strategy}_f{c:g}', f'{strategy} {c:.0%}', overrides))
  for estimator in ESTIMATORS:
    for refresh in (False, True):
      if estimator == 'deepfool' and not refresh:
        continue  # that is puma_f0.3 (deepfool is the default estimator)
      overrides = _puma(c, **{ESTIMATOR_FIELD: estimator})
      requires = (ESTIMATOR_FIELD,)
      name = f'puma_f{c:g}_{estimator}'
      if refresh:
        requires += (REFRESH_FIELD,)
        name += '_refresh'
      label = f'PUMA {c:.0%}, {estimator} margins' + (', refreshed' if refresh else '')
      out.append(Setting(name, label, overrides, requires, refresh=refresh))
  return out


@dataclasses.dataclass(frozen=True)
class Options:
  """One study (from the command line; errors name the flag)."""

  workdir: Path
  tiny: bool = False
  seeds: tuple[int, ...] = SEEDS
  train_steps: int = TRAIN_STEPS
  eval_examples: int = 0  # 0: the whole test split (1,000 embedded digits)
  autoattack_examples: int = AUTOATTACK_EXAMPLES
  with_fab_refresh: bool = False
  report_only: bool = False

  def settings(self) -> list[Setting]:
    settings = grid()
    if self.tiny:
      return [s for s in settings if s.name in TINY_SETTINGS]
    return [s for s in settings if self.with_fab_refresh or s.name not in OPTIONAL_SETTINGS]


def default_config(tiny: bool) -> Any:
  """configs/default.py (its `:tiny` variant with `tiny`)."""
  from configs import default  # noqa: PLC0415 (the repository's configs/ folder)

  return default.get_config('tiny' if tiny else None)


def has_field(config: Any, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if part not in node:
      return False
    node = node[part]
  return True


def _set(config: Any, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def base_config(opts: Options) -> Any:
  """The default pipeline whose data and margin model (and DeepFool margins) all runs share."""
  config = default_config(opts.tiny)
  config.data.data_dir = str(opts.workdir / 'data')
  return config


def run_config(opts: Options, setting: Setting, seed: int) -> Any:
  """A run's config: the shared data and margin model, the setting's overrides, the seed."""
  config = copy.deepcopy(base_config(opts))
  config.seed = seed
  config.margin_model.source = 'checkpoint'
  config.margin_model.path = str(opts.workdir / 'base' / 'margin_model')
  train = config.train
  study_steps = opts.train_steps if not opts.tiny else train.num_steps
  steps = study_steps * setting.steps_factor
  # The default's learning-rate schedule at this length (the same share of warm-up).
  train.warmup_steps = max(1, round(train.warmup_steps * steps / train.num_steps))
  train.num_steps = steps
  # The baselines' first seed shows their curves, a point every `study_steps / CURVE_POINTS`
  # steps (eval_every_steps does not change the training); the other runs evaluate at the end.
  curve = setting.name in CURVE_SETTINGS and seed == 0
  train.eval_every_steps = max(1, study_steps // CURVE_POINTS) if curve else steps
  train.checkpoint_every_steps = min(train.checkpoint_every_steps, steps)
  if not opts.tiny:
    config.eval.num_examples = opts.eval_examples
  config.eval.autoattack = 'none'  # AutoAttack runs afterwards, on the selected runs only
  for field, value in setting.overrides.items():
    _set(config, field, value)
  if setting.refresh:
    _set(config, REFRESH_FIELD, steps // 2)
  return config


def missing_fields(setting: Setting) -> list[str]:
  config = default_config(True)
  return [f for f in setting.requires if not has_field(config, f)]


def run_dir(opts: Options, setting: Setting, seed: int) -> Path:
  return opts.workdir / 'runs' / f'{setting.name}_s{seed}'


# ----------------------------------------------------------------------------- running


def _timed(fn: Any, *args: Any, **kwargs: Any) -> float:
  start = time.perf_counter()
  fn(*args, **kwargs)
  return time.perf_counter() - start


def _add_seconds(folder: Path, key: str, seconds: float) -> float:
  """Adds this invocation's seconds to `folder/study_seconds.json[key]`; the total so far.

  A study resumed over several invocations thus reports the wall time of all of them.
  """
  from puma_jax import artifacts  # noqa: PLC0415

  path = folder / 'study_seconds.json'
  times = artifacts.read_json(path) if path.exists() else {}
  times[key] = round(times.get(key, 0.0) + seconds, 1)
  artifacts.write_json(path, times)
  return times[key]


def run_base(opts: Options) -> None:
  """The data, the margin model and its DeepFool margins, once, in `<workdir>/base`."""
  from puma_jax import pipeline  # noqa: PLC0415 (JAX starts here, not at import)

  config = base_config(opts)
  for stage in ('prepare', 'margin_model', 'margins'):
    seconds = _timed(pipeline.run, config, opts.workdir / 'base', stage=stage)
    _add_seconds(opts.workdir / 'base', stage, seconds)
    logging.info('study: base stage %s in %.1f s', stage, seconds)


def run_one(opts: Options, setting: Setting, seed: int) -> dict[str, Any]:
  """The main job for one setting and seed (finished stages are skipped); its report row."""
  from puma_jax import pipeline  # noqa: PLC0415

  workdir = run_dir(opts, setting, seed)
  seconds = _timed(pipeline.run, run_config(opts, setting, seed), workdir)
  logging.info('study: run %s in %.1f s', workdir.name, seconds)
  _add_seconds(workdir, 'run', seconds)
  return finished_row(opts, setting, seed, with_autoattack=False)


def finished_row(
  opts: Options, setting: Setting, seed: int, *, with_autoattack: bool = True
) -> dict[str, Any] | None:
  """The report row of a finished run (its pipeline wrote report.json), else None.

  `with_autoattack`: also its AutoAttack accuracy, where that evaluation has finished.
  """
  from puma_jax import artifacts, metric_writer  # noqa: PLC0415

  workdir = run_dir(opts, setting, seed)
  if not (workdir / 'report.json').exists():
    return None
  logged = metric_writer.read_metrics(workdir / 'train' / 'metrics.jsonl')
  eps = [r['train/mean_eps'] for r in logged if 'train/mean_eps' in r]
  ev = artifacts.read_json(workdir / 'report.json')['evaluation_report']
  times_path = workdir / 'study_seconds.json'
  times = artifacts.read_json(times_path) if times_path.exists() else {}
  aa_path = workdir / 'autoattack' / 'report.json'
  aa = with_autoattack and aa_path.exists()
  return {
    'run': workdir.name,
    'setting': setting.name,
    'strategy': setting.strategy,
    'ratio': setting.ratio,
    'seed': seed,
    **{m: ev[m] for m in METRICS},
    'autoattack_acc': artifacts.read_json(aa_path)['autoattack_acc'] if aa else None,
    'mean_eps': sum(eps) / len(eps) if eps else None,
    'eval_examples': ev['n_examples'],
    'seconds': times.get('run', 0.0),  # wall time over every invocation that worked on it
    'autoattack_seconds': times.get('autoattack') if aa else None,
  }


def run_autoattack(opts: Options, setting: Setting, seed: int) -> tuple[float, float]:
  """AutoAttack standard on one trained run (the library's evaluator; resumable).

  Returns its accuracy and its wall time over every invocation.
  """
  from puma_jax import artifacts, datasets, evaluate, model_io  # noqa: PLC0415

  start = time.perf_counter()
  workdir = run_dir(opts, setting, seed)
  config = run_config(opts, setting, seed)
  config.eval.autoattack = 'standard'
  if not opts.tiny:
    config.eval.num_examples = opts.autoattack_examples
  prepared = datasets.prepare(config.data, config.data.data_dir, build=False)
  model, variables = model_io.restore_ema_variables(config.model, workdir / 'train')
  rep = evaluate.evaluate_workdir(
    config,
    model,
    variables,
    prepared.real_test,
    workdir / 'autoattack' / 'results',
    model_name=f'{config.model.name} ({workdir.name})',
    model_fingerprint=artifacts.tree_fingerprint(variables),
  )
  artifacts.write_json(workdir / 'autoattack' / 'report.json', rep)
  seconds = _add_seconds(workdir, 'autoattack', time.perf_counter() - start)
  return rep['autoattack_acc'], seconds


def run_study(opts: Options) -> tuple[list[dict[str, Any]], list[str]]:
  """Every available run, then AutoAttack on the baseline and the best PUMA setting.

  Returns the rows and the notes (skipped arms, the AutoAttack choice).
  """
  notes = []
  if not opts.tiny and not opts.with_fab_refresh:
    notes.append(
      'puma_f0.3_fab_refresh (FAB margins refreshed halfway): not run; one FAB refresh of '
      'the kept set costs about ten runs of training here. Run it with --with_fab_refresh.'
    )
  settings = []
  for s in opts.settings():
    missing = missing_fields(s)
    if missing:
      notes.append(
        f'{s.name} ({s.label}): not available, the config has no {", ".join(missing)}; '
        'it runs once the field exists.'
      )
      logging.info('study: %s', notes[-1])
    else:
      settings.append(s)
  if opts.report_only:
    return report_finished(opts, settings, notes)
  run_base(opts)
  rows = []
  total = len(settings) * len(opts.seeds)
  for seed in opts.seeds:  # seed by seed, so a partial study has whole seeds first
    for s in settings:
      logging.info('study: run %d/%d: %s seed %d', len(rows) + 1, total, s.name, seed)
      rows.append(run_one(opts, s, seed))
  summary = study_report.summarise(rows)
  best = study_report.best_puma(summary)
  chosen = [BASELINE] + ([best] if best else [])
  if opts.tiny:
    digits = "the config's evaluation digits"
  elif opts.autoattack_examples:
    digits = f'the first {opts.autoattack_examples} test digits'
  else:
    digits = 'all test digits'
  notes.append(
    f'AutoAttack (standard) on {" and ".join(chosen)} (the best PUMA setting by mean PGD '
    f'worst-case accuracy), every seed, on {digits}.'
  )
  by_name = {s.name: s for s in settings}
  for row in rows:
    if row['setting'] in chosen:
      acc, seconds = run_autoattack(opts, by_name[row['setting']], row['seed'])
      row['autoattack_acc'], row['autoattack_seconds'] = acc, seconds
  notes.append(wall_time_note(opts, rows))
  return rows, notes


def report_finished(
  opts: Options, settings: Sequence[Setting], notes: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
  """The rows of the runs that have finished, and a note naming the others (runs nothing)."""
  rows, missing = [], []
  for seed in opts.seeds:
    for s in settings:
      row = finished_row(opts, s, seed)
      if row is None:
        missing.append(f'{s.name}_s{seed}')
      else:
        rows.append(row)
  total = len(settings) * len(opts.seeds)
  notes.append(
    f'Partial report (--report_only): {len(rows)} of {total} runs finished'
    + (f'; not yet: {", ".join(missing)}.' if missing else '.')
    + ' AutoAttack where its evaluation has finished.'
  )
  notes.append(wall_time_note(opts, rows))
  return rows, notes


def wall_time_note(opts: Options, rows: Sequence[Mapping[str, Any]]) -> str:
  """The study's wall time, summed over every invocation that did its work (it resumes)."""
  from puma_jax import artifacts  # noqa: PLC0415

  path = opts.workdir / 'base' / 'study_seconds.json'
  base = sum(artifacts.read_json(path).values()) if path.exists() else 0.0
  runs = sum(r['seconds'] for r in rows)
  aa = sum(r['autoattack_seconds'] or 0.0 for r in rows)
  total = base + runs + aa
  return (
    f'Wall time {total / 3600:.2f} h ({total:,.0f} s), summed over the invocations that did '
    f'the work: base stages {base:,.0f} s, {len(rows)} runs {runs:,.0f} s, AutoAttack '
    f'{aa:,.0f} s.'
  )


# ----------------------------------------------------------------------------- report


def summary_markdown(
  opts: Options, summary: Sequence[Mapping[str, Any]], notes: Sequence[str], command: str
) -> str:
  """summary.md of the study (`study_report.markdown` with the study's setup)."""
  config = run_config(opts, grid()[0], 0)
  long = run_config(opts, grid()[1], 0)
  return study_report.markdown(
    summary,
    notes,
    title='PUMA study on the embedded default' + (' (tiny)' if opts.tiny else ''),
    preamble=[
      f'Command: `{command}`',
      '',
      f'Every run trains {config.train.num_steps} steps of batch {config.train.batch_size} '
      f'(`{config.train.loss}`, {config.attack.norm} eps {config.attack.eps:g}; '
      f'{LONG_BASELINE}: {long.train.num_steps} steps, the same schedule stretched) '
      f'and is evaluated on '
      f'{"all" if not config.eval.num_examples else config.eval.num_examples} '
      f'test digits (PGD-{config.eval.pgd_steps}, CE and CW losses; "PGD worst" counts an '
      'example robust when it survives both). Accuracies in percent, mean ± std over seeds '
      f'({", ".join(map(str, opts.seeds))}). "train eps": the training attack radius, the '
      "batches' mean eps averaged over the logged steps (mean over seeds).",
    ],
    labels={s.name: s.label for s in grid()},
    baseline=BASELINE,
    compare_ratio=COMPARE_RATIO,
  )


def write_report(
  opts: Options, rows: Sequence[Mapping[str, Any]], notes: Sequence[str], command: str
) -> str:
  """runs.csv, summary.csv, summary.md and the plots, in the study workdir."""
  from puma_jax import artifacts, report  # noqa: PLC0415

  out = opts.workdir
  summary = study_report.summarise(rows)
  text = summary_markdown(opts, summary, notes, command)
  if rows:  # (none when --report_only finds no finished run)
    artifacts.write_csv(out / 'runs.csv', rows)
    flat = [{k: v for k, v in s.items() if k != 'values'} for s in summary]
    artifacts.write_csv(out / 'summary.csv', flat)
    study_report.plot(summary, out, BASELINE)
  artifacts.write_text(out / 'summary.md', text)
  curves = {
    f'{s.name}, {run_config(opts, s, 0).train.num_steps} steps': report.training_curves(
      run_dir(opts, s, 0) / 'train' / 'metrics.jsonl'
    )
    for s in grid()
    if s.name in CURVE_SETTINGS
  }
  report.plot_training_curves(curves, out / 'baseline_curve.png')
  return text


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str]) -> Options:
  p = argparse.ArgumentParser(
    prog='python -m experiments.study',
    description='The PUMA study on the embedded default (resumable: rerun the same command).',
  )
  p.add_argument('--workdir', required=True, help='folder for everything; rerun to resume')
  p.add_argument('--tiny', action='store_true', help='a few settings, one seed, :tiny config')
  p.add_argument(
    '--train_steps',
    type=int,
    default=TRAIN_STEPS,
    help=f"training steps of every run (default {TRAIN_STEPS}; --tiny: the tiny config's)",
  )
  p.add_argument(
    '--autoattack_examples',
    type=int,
    default=AUTOATTACK_EXAMPLES,
    help=f'AutoAttack on the first N test digits (default {AUTOATTACK_EXAMPLES}; 0: all)',
  )
  p.add_argument(
    '--with_fab_refresh',
    action='store_true',
    help='also run PUMA 30%% with FAB margins refreshed (about 10 runs of training each)',
  )
  p.add_argument(
    '--report_only',
    action='store_true',
    help="write the report of the runs finished so far and exit (a study's progress)",
  )
  a = p.parse_args(argv)
  if a.train_steps < 1:
    p.error(f'--train_steps must be >= 1, got {a.train_steps}')
  if a.autoattack_examples < 0:
    p.error(f'--autoattack_examples must be >= 0, got {a.autoattack_examples}')
  return Options(
    workdir=Path(a.workdir).expanduser(),
    tiny=a.tiny,
    seeds=(0,) if a.tiny else SEEDS,
    train_steps=a.train_steps,
    autoattack_examples=a.autoattack_examples,
    with_fab_refresh=a.with_fab_refresh,
    report_only=a.report_only,
  )


def _setup(opts: Options) -> None:
  import jax  # noqa: PLC0415

  logs.setup_script_logging()
  # Every run compiles the same programs; XLA's persistent cache compiles each once.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', str(opts.workdir / 'compilation_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def main(argv: Sequence[str] | None = None) -> str:
  argv = list(sys.argv[1:] if argv is None else argv)
  opts = parse_args(argv)
  _setup(opts)
  start = time.perf_counter()
  rows, notes = run_study(opts)
  made_by = [a for a in argv if a != '--report_only']  # the command that runs (or resumes) it
  text = write_report(opts, rows, notes, 'python -m experiments.study ' + ' '.join(made_by))
  print(text)  # noqa: T201
  seconds = time.perf_counter() - start
  print(f'wrote {opts.workdir}/summary.md and its plots in {seconds:.0f}s')  # noqa: T201
  return text


if __name__ == '__main__':
  main()
