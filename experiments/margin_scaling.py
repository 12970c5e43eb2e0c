r"""Margin scaling: the margin distribution and the margin stage's cost as the data grow.

One margin model scores generated sets of growing size (by default 1x to 10x the
4,000 real training digits of the embedded default) with the margin stage itself,
`puma_jax.margins.compute_margins`, and the script records what the stage
measured (wall time, compilation, examples/s, DeepFool steps) and the margin
distribution of every size:

- data: for each size N, the embedded generator's output at that size
  (`data.generated.num_examples=N`, generator seed `--data_seed`, a dataset of
  its own, `mnist_generated_s<seed>_n<N>`, under `<out>/data`; sidecars beside
  its shards). The sets are independent draws from the same generator, and the
  default seed 1 differs from the seed of the data the margin model was trained
  on (0), so no size holds the margin model's own training examples;
- margin model: the default pipeline's (its prepare and margin_model stages run
  once in `<out>/base`: TRADES, 300 steps), or an existing training workdir
  given with `--margin_model` (e.g. a pipeline's `WORKDIR/margin_model`, or the
  study's `<workdir>/base/margin_model`), loaded once for every size;
- cost: the stage's wall time from call to return (reading the shards, DeepFool,
  writing sidecars and manifests, loading the arrays back, the summary and its
  histogram). The DeepFool program is compiled once, for the first size, and its
  compilation time is reported apart; examples/s excludes it.

Rerunning the same command skips the sizes already done (their sidecars and
`sizes/n<N>/result.json`) and keeps their measured times; a size interrupted
mid-way resumes shard by shard and is marked as resumed (its time is then
partial). Sidecars made with another margin model or other DeepFool settings
are refused, never mixed.

  python -m experiments.margin_scaling --out=/tmp/margin_scaling

writes into --out: `results.csv` (one row per size), `table.md`, `margin_scaling.png`
(margin histograms and quantiles against size; examples/s and seconds against
size) and `scaling.json` (settings, margin model, command), and prints the
table. `--tiny` runs on the `:tiny` config with small sizes in seconds (tests).
"""

import argparse
import copy
import dataclasses
import io
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from puma_jax import logs, tables  # no JAX: it starts later

SIZES = (4_000, 8_000, 16_000, 24_000, 32_000, 40_000)
TINY_SIZES = (200, 400)
QUANTILES = ('0.01', '0.1', '0.25', '0.5', '0.75', '0.9', '0.99')
RESULT = 'result.json'


@dataclasses.dataclass(frozen=True)
class Settings:
  """One study; validated on construction (errors name the flag).

  Attributes:
    out: folder for everything (--out).
    sizes: generated-set sizes N, increasing (--sizes).
    margin_model: a training workdir with `checkpoints/` to take the margin
      model from; '' trains the default pipeline's in `<out>/base` (--margin_model).
    data_seed: the generator's seed for the scored sets (--data_seed).
    tiny: the `:tiny` config (--tiny).
  """

  out: Path
  sizes: tuple[int, ...] = SIZES
  margin_model: str = ''
  data_seed: int = 1
  tiny: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'out', Path(self.out).expanduser())
    object.__setattr__(self, 'sizes', tuple(int(n) for n in self.sizes))
    if not self.sizes or min(self.sizes) < 1:
      raise ValueError(f'--sizes: give positive example counts, got {self.sizes}')
    if list(self.sizes) != sorted(set(self.sizes)):
      raise ValueError(f'--sizes: give distinct sizes in increasing order, got {self.sizes}')
    if self.data_seed < 0:
      raise ValueError(f'--data_seed must be >= 0, got {self.data_seed}')
    if self.margin_model and not (Path(self.margin_model) / 'checkpoints').is_dir():
      raise ValueError(
        f'--margin_model={self.margin_model}: no checkpoints/ folder there; give a training '
        "workdir such as a pipeline run's WORKDIR/margin_model, or leave it out to train one"
      )

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['out'] = str(self.out)
    return d


def default_config(tiny: bool) -> Any:
  """configs/default.py (its `:tiny` variant with `tiny`)."""
  from configs import default  # noqa: PLC0415 (the repository's configs/ folder)

  return default.get_config('tiny' if tiny else None)


def base_config(settings: Settings) -> Any:
  config = default_config(settings.tiny)
  config.data.data_dir = str(settings.out / 'data')
  return config


def size_config(settings: Settings, n: int) -> Any:
  """The base config with a generated set of `n` examples (a dataset of its own)."""
  config = copy.deepcopy(base_config(settings))
  gen = config.data.generated
  gen.num_examples = n
  gen.seed = settings.data_seed
  gen.name = f'{gen.name}_s{settings.data_seed}_n{n}'
  return config


def size_dir(settings: Settings, n: int) -> Path:
  return settings.out / 'sizes' / f'n{n}'


# ----------------------------------------------------------------------------- running


def load_margin_model(settings: Settings) -> tuple[Any, Any, str]:
  """(module, EMA variables, where from): `--margin_model`, or the default's trained here."""
  from puma_jax import model_io, pipeline  # noqa: PLC0415

  config = base_config(settings)
  if settings.margin_model:
    path = Path(settings.margin_model)
  else:
    workdir = settings.out / 'base'
    logging.info('margin scaling: training the default margin model in %s', workdir)
    for stage in ('prepare', 'margin_model'):
      pipeline.run(config, workdir, stage=stage)
    path = workdir / 'margin_model'
  model, variables = model_io.restore_ema_variables(config.model, path)
  return model, variables, str(path)


def score_size(
  settings: Settings, n: int, model: Any, variables: Any, fingerprint: str
) -> tuple[dict[str, Any], np.ndarray]:
  """The margin stage on the set of size n (or its saved result); returns (row, margins f32[n])."""
  from puma_jax import artifacts, datasets, margins  # noqa: PLC0415
  from puma_jax.datasets import sidecar  # noqa: PLC0415

  config = size_config(settings, n)
  prepared = datasets.prepare(config.data, settings.out / 'data')
  split = {'generated': prepared.generated}
  deepfool = margins.settings_from_config(config.margins)
  out_dir = size_dir(settings, n)
  saved = artifacts.read_json(out_dir / RESULT) if (out_dir / RESULT).exists() else None
  expected = {'model_fingerprint': fingerprint, 'deepfool': deepfool.as_dict(), 'size': n}
  if saved is not None:
    artifacts.check_same(
      saved['settings'],
      expected,
      what=str(out_dir / RESULT),
      fix='Rerun with the flags it was made with, or use another --out.',
      error=ValueError,
    )
    logging.info('margin scaling: size %d done before, loading its margins', n)
    values = margins.load_margins(model, variables, split, settings=deepfool)['generated']
    return {k: saved['row'][k] for k in saved['columns']}, values
  logging.info('margin scaling: scoring %d generated examples', n)
  start, cpu_start = time.perf_counter(), time.process_time()
  try:
    result = margins.compute_margins(
      model,
      variables,
      split,
      settings=deepfool,
      batch_size=config.margins.batch_size,
      deepfool_batch_size=config.margins.deepfool_batch_size,
      summary_dir=out_dir,
      read_threads=config.data.read_threads,
      prefetch_batches=config.data.prefetch_batches,
    )
  except sidecar.SidecarError as e:
    raise sidecar.SidecarError(
      f'{e}\n{settings.out} holds margins of another margin model or other settings; use '
      'another --out (or the --margin_model it was made with).'
    ) from e
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  run = result.run
  stats = result.summary['by_source']['generated']
  values = result.margins['generated']
  eps = float(config.attack.eps)
  seconds_no_compile = wall - run['compile_seconds']
  row = {
    'examples': n,
    'times_real': round(n / prepared.real_train.num_examples, 3),
    'seconds': round(wall, 2),
    'cpu_seconds': round(cpu, 2),
    'compile_seconds': round(run['compile_seconds'], 2),
    'examples_per_s': round(run['examples_computed'] / seconds_no_compile, 2)
    if run['examples_computed']
    else None,
    'deepfool_steps_mean': round(stats['iterations']['mean'], 3),
    'not_converged': stats['not_converged'],
    'fraction_negative': round(stats['fraction_negative'], 5),
    'below_eps': int(np.sum(values < eps)),
    'fraction_below_eps': round(float(np.mean(values < eps)), 5),
    'mean': stats['mean'],
    **{f'q{q}': stats['quantiles'][q] for q in QUANTILES},
    'resumed': bool(run['shards_skipped'].get('generated')),
    'devices': run['devices'],
    'batch_size': run['batch_size'],
  }
  # The JSON file sorts keys; 'columns' keeps the table's column order.
  artifacts.write_json(out_dir / RESULT, {'settings': expected, 'row': row, 'columns': list(row)})
  return row, values


def run_study(settings: Settings) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, Any]]:
  """Loads (or trains) the margin model, then scores every size; returns (info, rows, margins)."""
  from puma_jax import margins  # noqa: PLC0415

  settings.out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  model, variables, source = load_margin_model(settings)
  fingerprint = margins.model_fingerprint(variables)
  info = {
    'margin_model': source,
    'model_fingerprint': fingerprint,
    'margin_model_seconds': round(time.perf_counter() - start, 1),
  }
  rows, values = [], {}
  for n in settings.sizes:
    row, values[n] = score_size(settings, n, model, variables, fingerprint)
    rows.append(row)
  return info, rows, values


# ----------------------------------------------------------------------------- outputs


def linear_fit(rows: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
  """(seconds per 1,000 examples, fixed seconds) of a least-squares line through the
  sizes' times without compilation; None with fewer than two sizes."""
  if len(rows) < 2:
    return None
  n = np.array([r['examples'] for r in rows], np.float64)
  s = np.array([r['seconds'] - r['compile_seconds'] for r in rows], np.float64)
  slope, intercept = np.polyfit(n, s, 1)
  return 1000.0 * float(slope), float(intercept)


def format_table(rows: Sequence[Mapping[str, Any]], *, eps: float) -> str:
  """One row per size: the stage's cost, then the margin distribution."""
  columns = [
    'generated examples',
    'x real',
    'seconds',
    'CPU seconds',
    'examples/s',
    'DeepFool steps',
    'not converged',
    'negative',
    f'below eps={eps:g}',
    *('q0.01', 'q0.1', 'median', 'q0.9', 'q0.99'),
  ]
  cells = []
  for r in rows:
    secs = f'{r["seconds"]:.0f}'
    if r['compile_seconds'] >= 0.5:
      secs += f' ({r["compile_seconds"]:.0f} compiling)'
    if r['resumed']:
      secs += ' (resumed: partial)'
    rate = '-' if r['examples_per_s'] is None else f'{r["examples_per_s"]:.0f}'
    cells.append(
      [
        f'{r["examples"]:,}',
        f'{r["times_real"]:g}',
        secs,
        f'{r["cpu_seconds"]:.0f}',
        rate,
        f'{r["deepfool_steps_mean"]:.2f}',
        f'{r["not_converged"] / r["examples"]:.1%}',
        f'{r["fraction_negative"]:.1%}',
        f'{r["fraction_below_eps"]:.1%} ({r["below_eps"]:,})',
        *(f'{r[f"q{q}"]:.4f}' for q in ('0.01', '0.1', '0.5', '0.9', '0.99')),
      ]
    )
  return tables.markdown_table(columns, cells)


def report(
  settings: Settings, info: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, command: str
) -> str:
  import jax  # noqa: PLC0415

  config = base_config(settings)
  m = config.margins
  fit = linear_fit(rows)
  device = jax.devices()[0]
  lines = [
    '# Margin scaling on the embedded default',
    '',
    f'Command: `{command}`',
    '',
    f'Margin model: `{info["margin_model"]}` ({info["model_fingerprint"][:19]}...). DeepFool '
    f'{m.norm}, {m.num_candidates} candidates, at most {m.max_iter} steps, batch {m.batch_size} '
    f'on {rows[0]["devices"] if rows else "?"} {device.platform.upper()} device(s). Generated '
    f'sets of each size from the embedded generator (seed {settings.data_seed}); "x real" is the '
    'size over the 4,000 real training digits. Margins in pixel units of [0, 1] images; '
    '"below eps" counts the examples whose PUMA radius is reduced '
    f'(margin < eps={config.attack.eps:g}). '
    '"seconds" is the whole margin stage (read, DeepFool, write, load, summary); examples/s '
    'leaves out the one-off compilation.',
    '',
    format_table(rows, eps=float(config.attack.eps)),
    '',
  ]
  if fit is not None:
    lines += [
      f'Least-squares line through the times without compilation: {fit[0]:.2f} s per 1,000 '
      f'examples + {fit[1]:.1f} s fixed.',
      '',
    ]
  return '\n'.join(lines)


def plot(
  settings: Settings,
  rows: Sequence[Mapping[str, Any]],
  values: Mapping[int, np.ndarray],
  path: Path,
  *,
  eps: float,
) -> None:
  """Histograms and quantiles of margins against size; examples/s and seconds against size."""
  from matplotlib import cm  # noqa: PLC0415
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  from puma_jax import artifacts  # noqa: PLC0415

  fig = Figure(figsize=(11, 8))
  FigureCanvasAgg(fig)
  (ax_hist, ax_q), (ax_rate, ax_time) = fig.subplots(2, 2)
  sizes = np.array([r['examples'] for r in rows])
  colors = cm.viridis(np.linspace(0.0, 0.9, len(rows)))
  finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
  edges = np.linspace(finite.min(), finite.max(), 81) if len(finite) else np.linspace(-1, 1, 81)
  for color, r in zip(colors, rows, strict=True):
    v = values[r['examples']]
    ax_hist.hist(
      v[np.isfinite(v)],
      bins=edges,
      density=True,
      histtype='step',
      color=color,
      lw=1.3,
      label=f'{r["examples"]:,}',
    )
  for x in (0.0, eps):
    ax_hist.axvline(x, color='0.4', lw=0.8, ls='--')
  ax_hist.set_xlabel('signed margin (linf); dashed: 0 and eps')
  ax_hist.set_ylabel('density')
  ax_hist.set_title('margin distribution by set size', fontsize=10)
  ax_hist.legend(fontsize=7, title='examples', title_fontsize=7)

  for q, color in zip(QUANTILES, cm.plasma(np.linspace(0.0, 0.85, len(QUANTILES))), strict=True):
    ax_q.plot(sizes, [r[f'q{q}'] for r in rows], 'o-', color=color, ms=4, label=f'q{q}')
  ax_q.axhline(eps, color='0.4', lw=0.8, ls='--')
  ax_q.set_xscale('log')
  ax_q.set_xlabel('generated examples')
  ax_q.set_ylabel('margin quantile')
  ax_q.set_title('margin quantiles vs size (dashed: eps)', fontsize=10)
  ax_q.legend(fontsize=7, ncol=2)

  rate = [r['examples_per_s'] or np.nan for r in rows]
  ax_rate.plot(sizes, rate, 'o-', color='tab:blue', label='examples/s (without compilation)')
  ax_rate.set_ylim(0, np.nanmax(rate) * 1.2 if np.isfinite(np.nanmax(rate)) else 1)
  ax_rate.set_xscale('log')
  ax_rate.set_xlabel('generated examples')
  ax_rate.set_ylabel('examples/s', color='tab:blue')
  ax_steps = ax_rate.twinx()
  ax_steps.plot(sizes, [r['deepfool_steps_mean'] for r in rows], 's--', color='tab:orange')
  ax_steps.set_ylabel('mean DeepFool steps per example', color='tab:orange')
  ax_steps.set_ylim(0, max(r['deepfool_steps_mean'] for r in rows) * 1.3)
  ax_rate.set_title('margin stage throughput', fontsize=10)

  secs = np.array([r['seconds'] for r in rows])
  compile_s = np.array([r['compile_seconds'] for r in rows])
  ax_time.plot(sizes, secs, 'o', color='tab:green', label='margin stage (wall)')
  ax_time.plot(sizes, secs - compile_s, 'x', color='tab:green', label='without compilation')
  fit = linear_fit(rows)
  if fit is not None:
    xs = np.linspace(0, sizes.max(), 50)
    ax_time.plot(
      xs,
      fit[1] + fit[0] * xs / 1000.0,
      '-',
      color='0.5',
      lw=1,
      label=f'fit: {fit[0]:.2f} s / 1k examples + {fit[1]:.1f} s',
    )
  ax_time.set_xlabel('generated examples')
  ax_time.set_ylabel('seconds')
  ax_time.set_xlim(0, sizes.max() * 1.05)
  ax_time.set_ylim(0, secs.max() * 1.15)
  ax_time.set_title('margin stage time', fontsize=10)
  ax_time.legend(fontsize=7)
  for ax in (ax_q, ax_rate):  # log axes, labelled at the sizes themselves
    ax.set_xticks(sizes, [f'{n:,}' for n in sizes], fontsize=7)
    ax.minorticks_off()
  for ax in (ax_hist, ax_q, ax_rate, ax_time):
    ax.grid(alpha=0.3)
  fig.suptitle(
    'Margins of growing generated sets, one margin model'
    + (' (tiny config)' if settings.tiny else ''),
    fontsize=11,
  )
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  artifacts.write_bytes(path, buf.getvalue())


def write_outputs(
  settings: Settings,
  info: Mapping[str, Any],
  rows: Sequence[Mapping[str, Any]],
  values: Mapping[int, np.ndarray],
  *,
  command: str,
  seconds: float,
) -> str:
  """Writes results.csv, table.md, margin_scaling.png and scaling.json; returns table.md."""
  from puma_jax import artifacts  # noqa: PLC0415

  out = settings.out
  eps = float(base_config(settings).attack.eps)
  text = report(settings, info, rows, command=command)
  artifacts.write_csv(out / 'results.csv', rows)
  artifacts.write_text(out / 'table.md', text)
  plot(settings, rows, values, out / 'margin_scaling.png', eps=eps)
  artifacts.write_json(
    out / 'scaling.json',
    {
      'settings': settings.to_dict(),
      'command': command,
      **info,
      'fit_seconds_per_1000_and_fixed': linear_fit(rows),
      'seconds_this_invocation': round(seconds, 1),
    },
  )
  return text


# ----------------------------------------------------------------------------- command line


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v.replace('_', '')) for v in text.split(',') if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'--sizes takes comma-separated integers, e.g. --sizes=4000,8000; got {text!r}'
    ) from None


def parse_args(argv: Sequence[str]) -> Settings:
  """Settings from command-line arguments (errors name the flag)."""
  p = argparse.ArgumentParser(
    prog='python -m experiments.margin_scaling',
    description='Margin distribution and margin-stage cost against the size of the data.',
  )
  p.add_argument('--out', required=True, help='folder for everything; rerun to resume')
  p.add_argument(
    '--sizes',
    type=_ints,
    default=None,
    help=f'generated examples per set (default {",".join(map(str, SIZES))}; '
    f'--tiny: {",".join(map(str, TINY_SIZES))})',
  )
  p.add_argument(
    '--margin_model',
    default='',
    help="training workdir of the margin model (with checkpoints/), e.g. a pipeline run's "
    'WORKDIR/margin_model; default: train the default one in <out>/base',
  )
  p.add_argument('--data_seed', type=int, default=1, help='generator seed of the scored sets')
  p.add_argument('--tiny', action='store_true', help='the :tiny config and small sizes (tests)')
  a = p.parse_args(argv)
  sizes = a.sizes if a.sizes is not None else (TINY_SIZES if a.tiny else SIZES)
  try:
    return Settings(
      out=Path(a.out), sizes=sizes, margin_model=a.margin_model, data_seed=a.data_seed, tiny=a.tiny
    )
  except ValueError as e:
    p.error(str(e))


def main(argv: Sequence[str] | None = None) -> str:
  argv = list(sys.argv[1:] if argv is None else argv)
  settings = parse_args(argv)
  logs.setup_script_logging()
  command = 'python -m experiments.margin_scaling ' + ' '.join(argv)
  start = time.perf_counter()
  info, rows, values = run_study(settings)
  text = write_outputs(
    settings, info, rows, values, command=command, seconds=time.perf_counter() - start
  )
  print(text)  # noqa: T201
  print(  # noqa: T201
    f'wrote {settings.out}/{{results.csv,table.md,margin_scaling.png,scaling.json}} in '
    f'{time.perf_counter() - start:.0f}s'
  )
  return text


if __name__ == '__main__':
  main()
