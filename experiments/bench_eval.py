r"""AutoAttack in JAX against the original AutoAttack and torchattacks', on the same weights and inputs.

The model is the trained model of a finished pipeline run (the EMA weights of
`<workdir>/train`, as the pipeline's evaluation uses them) and the inputs are the
first `--num_examples` examples of the workdir's test split. Two implementations
attack them, one after the other, never at the same time:

* JAX: `puma_jax.attacks.autoattack.run_standard` (clean check, APGD-CE, APGD-T,
  FAB-T, Square), jit-compiled and run over the device mesh in batches of
  `--batch_size`, with the per-example keys that `puma_jax.evaluate` uses, so its
  flags equal the pipeline's own evaluation (checked when `<workdir>/evaluate`
  holds comparable results).
* PyTorch (`--peers`): the same weights exported to the equivalent PyTorch model
  (experiments/peers/export.py: model.json and a state_dict .npz; small_cnn and
  preact_resnet18) and attacked in the peer virtualenv
  (experiments/peers/bench_eval_worker.py, one subprocess per run) by
  - `autoattack`: the original AutoAttack (fra31/auto-attack, version='standard'),
    the reference that `run_standard` follows;
  - `torchattacks`: `torchattacks.AutoAttack(version='standard')`.
  Before any attack the peer checks that its logits equal the JAX logits.

Budgets. torchattacks' "standard" AutoAttack (3.5.1) runs APGD-CE, APGD-T and
FAB-T with 10 iterations each, where the original AutoAttack and `run_standard`
use 100; all use 9 target classes and 5,000 Square queries. So the script runs,
by default, JAX at both budgets (`standard`: the reference's; `torchattacks`: the
peer's), the original AutoAttack at `--autoattack_budgets` (standard) and
torchattacks as shipped (`--peer_budgets`): the like-for-like comparisons are JAX
`standard` against the original and JAX `torchattacks` against torchattacks.

Printed side by side: clean accuracy, robust accuracy after each attack, wall
and CPU time (JAX compilation separately), the per-example agreement of the flags
after each attack and the examples whose final flags differ, and each
like-for-like verdict against its target (the same robust accuracy within 1 point
of the original AutoAttack, within 0.5 points of torchattacks, in less time).
Fairness: both sides run on the same `--threads` cores (CPU affinity, set before
JAX starts its thread pool; torch.set_num_threads in the peer), with the peer's
model parameters frozen (no weight gradients), and one side at a time.

Usage (the peer virtualenv once, see docs/peers.md; then the benchmark):

  bash experiments/peers/setup_venv.sh
  PYTHONPATH=. python experiments/bench_eval.py --workdir=/tmp/puma_default \\
      --num_examples=250 --jax_budgets=standard --peers=autoattack --out=/tmp/bench_eval
"""

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments import peers
from experiments.peers import export
from puma_jax import artifacts, datasets, evaluate, margins, model_io, parallel
from puma_jax.attacks import autoattack
from puma_jax.datasets import input_pipeline
from puma_jax.progress import Progress

PEER_SCRIPT = peers.HERE / 'bench_eval_worker.py'
PEERS = ('autoattack', 'torchattacks')

# AutoAttack budgets: iterations of APGD-CE / APGD-T and of FAB-T (per target), target
# classes (capped at K - 1), Square's queries.
BUDGETS = {
  # The reference (fra31/auto-attack, version='standard'); puma_jax's default.
  'standard': dict(apgd_steps=100, fab_steps=100, num_targets=9, square_queries=5000),
  # torchattacks.AutoAttack(version='standard') 3.5.1: its APGD, APGDT and FAB keep
  # their default steps=10 (the peer reports the budgets it actually ran).
  'torchattacks': dict(apgd_steps=10, fab_steps=10, num_targets=9, square_queries=5000),
  # Smoke tests only.
  'quick': dict(apgd_steps=5, fab_steps=5, num_targets=9, square_queries=50),
}
STAGES = ('clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square')
# The targets: the same robust accuracy within this many points of each peer.
TARGET_POINTS = {'autoattack': 1.0, 'torchattacks': 0.5}


def log(*a: Any) -> None:
  print(f'[{time.strftime("%H:%M:%S")}]', *a, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument('--workdir', required=True, help='a finished pipeline run (holding train/)')
  ap.add_argument('--num_examples', type=int, default=1000, help='first N test examples')
  ap.add_argument(
    '--peers',
    default=','.join(PEERS),
    help=f'comma list of {PEERS}: the original AutoAttack (fra31/auto-attack) and '
    "torchattacks'; empty: the JAX side only",
  )
  ap.add_argument(
    '--peer_python',
    default='',
    help='python of the peer virtualenv (default: $PUMA_PEERS_VENV/bin/python, else '
    '.peers/venv/bin/python; build it with `bash experiments/peers/setup_venv.sh`)',
  )
  ap.add_argument(
    '--out',
    default='',
    help='folder for bench_eval.json, bench_eval.md, flags.npz (per-example flags of every '
    "run) and exchange/ (the peer's .npz files); empty: print only",
  )
  ap.add_argument(
    '--threads',
    type=int,
    default=0,
    help='CPU cores for each side (affinity of both processes; torch threads); 0: all allowed',
  )
  ap.add_argument('--jax_budgets', default='standard,torchattacks', help=f'of {list(BUDGETS)}')
  ap.add_argument(
    '--peer_budgets',
    default='torchattacks',
    help="torchattacks' budgets: 'torchattacks' is torchattacks.AutoAttack as shipped; "
    'others build the same attack classes with those budgets',
  )
  ap.add_argument(
    '--autoattack_budgets',
    default='standard',
    help="the original AutoAttack's budgets ('standard': as shipped)",
  )
  ap.add_argument(
    '--batch_size', type=int, default=0, help='examples per call, both sides (0: eval.batch_size)'
  )
  ap.add_argument(
    '--chunk_size', type=int, default=-1, help='JAX chunk_size (-1: eval.autoattack_chunk_size)'
  )
  ap.add_argument('--cpu_devices', type=int, default=0, help='emulate N CPU devices (0: default)')
  ap.add_argument('--logits_tol', type=float, default=1e-4, help='max |JAX - torch logits|')
  ap.add_argument(
    '--allow_unfinished',
    action='store_true',
    help='use the latest checkpoint of unfinished training',
  )
  args = ap.parse_args(argv)
  args.jax_budgets = _names(args.jax_budgets, '--jax_budgets', ap)
  args.peer_budgets = _names(args.peer_budgets, '--peer_budgets', ap)
  args.autoattack_budgets = _names(args.autoattack_budgets, '--autoattack_budgets', ap)
  args.peers = [p for p in args.peers.split(',') if p]
  unknown = sorted(set(args.peers) - set(PEERS))
  if unknown:
    ap.error(f'--peers: unknown {unknown}; choose from {list(PEERS)}')
  if args.num_examples <= 0:
    ap.error(f'--num_examples must be positive, got {args.num_examples}')
  return args


def _names(value: str, flag: str, ap: argparse.ArgumentParser) -> list[str]:
  names = [v for v in value.split(',') if v]
  unknown = [v for v in names if v not in BUDGETS]
  if unknown:
    ap.error(f'{flag}: unknown budgets {unknown}; choose from {list(BUDGETS)}')
  return names


def pin_cpus(threads: int) -> list[int]:
  """Restricts this process (and its children) to `threads` of its allowed cores.

  Call before JAX starts its backend: XLA sizes its thread pool from the affinity mask.
  """
  allowed = sorted(os.sched_getaffinity(0))
  if threads <= 0:
    return allowed
  if threads > len(allowed):
    raise SystemExit(f'--threads {threads}: only {len(allowed)} cores are allowed here')
  os.sched_setaffinity(0, allowed[:threads])
  return allowed[:threads]


# ------------------------------------------------------------------------ workdir


def load_config(workdir: Path) -> Any:
  """The config a workdir was made with: `config.json` over the current schema."""
  try:
    config, ignored = artifacts.load_config(workdir)
  except FileNotFoundError as e:
    raise SystemExit(f'--workdir {workdir}: {e}') from e
  if ignored:
    log(f'{workdir / artifacts.CONFIG_FILE}: fields not in the current schema, ignored: {ignored}')
  return config


def load_test_examples(config: Any, workdir: Path, n: int) -> tuple[np.ndarray, np.ndarray, Any]:
  """The first n examples of the workdir's test split: x f32[n,H,W,C] in [0,1], y i32[n]."""
  prepared = datasets.prepare(config.data, workdir / 'data', build=False)
  split = prepared.real_test
  if n > split.num_examples:
    raise SystemExit(f'--num_examples {n}: the test split has only {split.num_examples}')
  images, labels = input_pipeline.read_examples(split, np.arange(n))
  return images.astype(np.float32) / 255.0, labels.astype(np.int32), split


def restore_model(config: Any, workdir: Path, image_shape: tuple[int, ...], allow_unfinished: bool):
  """The Flax module and the EMA variables of `<workdir>/train` (as the evaluation uses them)."""
  train_dir = workdir / 'train'
  if not (train_dir / 'stage.json').exists() and not allow_unfinished:
    raise SystemExit(
      f'{train_dir / "stage.json"} is missing: training has not finished in {workdir}; '
      'wait for it, or pass --allow_unfinished to use its latest checkpoint'
    )
  if config.model.dtype != 'float32':
    raise SystemExit(
      f'model.dtype={config.model.dtype!r} in {workdir}/config.json: the PyTorch export '
      'computes in float32, so the two models would differ; benchmark a float32 run'
    )
  return model_io.restore_ema_variables(config.model, train_dir)


# ---------------------------------------------------------------------------- JAX


def example_keys(seed: int, index: np.ndarray) -> Any:
  """key[n]: example i's AutoAttack key, derived as `puma_jax.evaluate` derives it."""
  aa_rng = jax.random.fold_in(jax.random.key(seed), 1)
  return jax.vmap(lambda i: jax.random.fold_in(aa_rng, i))(np.asarray(index, np.int32))


def _attack(variables, keys, x, y, mask, *, model, mesh, **kwargs):
  return autoattack.run_standard(
    lambda z: model.apply(variables, z, train=False),
    keys,
    x,
    y,
    mask=mask,
    map_fn=functools.partial(parallel.per_device, mesh=mesh, num_batched_args=4),
    **kwargs,
  )


def run_jax(
  model: Any,
  variables: Any,
  x: np.ndarray,
  y: np.ndarray,
  *,
  norm: str,
  eps: float,
  seed: int,
  budgets: dict[str, int],
  batch_size: int,
  chunk_size: int | None,
  mesh: Any = None,
  progress_log: Callable[[str], None] = log,
) -> dict[str, Any]:
  """AutoAttack in JAX on x f32[N,H,W,C], y i32[N] in batches; flags and times.

  Returns:
    {'robust': bool[N, 5] (STAGES), 'x_adv': f32[N,H,W,C], 'compile_wall_s',
    'compile_cpu_s', 'wall_s', 'cpu_s' (the attack calls, compilation excluded),
    'batch_size', 'num_devices', 'chunk_size', 'budgets'}.
  """
  mesh = mesh or parallel.make_mesh()
  n, n_dev = len(x), parallel.num_devices(mesh)
  bs = -(-min(batch_size, n) // n_dev) * n_dev  # whole rows per device
  data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)
  fn = jax.jit(
    functools.partial(
      _attack, model=model, mesh=mesh, norm=norm, eps=eps, chunk_size=chunk_size, **budgets
    ),
    in_shardings=(repl, data, data, data, data),
  )
  variables = jax.device_put(variables, repl)

  def batch(start: int) -> list[jax.Array]:
    rows = start + np.arange(bs)
    real = rows < n
    rows = np.where(real, rows, start)  # padding repeats the first row and is never attacked
    arrays = (example_keys(seed, rows), x[rows], y[rows], real)
    return [jax.device_put(a, data) for a in arrays]

  c0, t0 = time.process_time(), time.perf_counter()
  compiled = fn.lower(variables, *batch(0)).compile()
  compile_wall, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
  progress_log(f'  compiled in {compile_wall:.1f} s ({bs} rows per call on {n_dev} devices)')

  robust, x_adv = [], []
  progress = Progress('jax autoattack', n, every_s=0.0, log_fn=progress_log)
  wall = cpu = 0.0
  for start in range(0, n, bs):
    inputs = jax.block_until_ready(batch(start))
    c0, t0 = time.process_time(), time.perf_counter()
    result = jax.block_until_ready(compiled(variables, *inputs))
    wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
    m = min(bs, n - start)
    robust.append(np.asarray(result.robust)[:m])
    x_adv.append(np.asarray(result.x_adv)[:m])
    progress.update(m, extra=f'robust so far {np.concatenate(robust)[:, -1].mean():.2%}')
  progress.close()
  return {
    'robust': np.concatenate(robust),
    'x_adv': np.concatenate(x_adv),
    'compile_wall_s': compile_wall,
    'compile_cpu_s': compile_cpu,
    'wall_s': wall,
    'cpu_s': cpu,
    'batch_size': bs,
    'num_devices': n_dev,
    'chunk_size': chunk_size,
    'budgets': dict(budgets),
  }


# --------------------------------------------------------------------------- peer


def run_peer(
  peer_python: str,
  exchange: Path,
  peer: str,
  budget: str,
  *,
  eps: float,
  norm: str,
  seed: int,
  threads: int,
  batch_size: int,
  logits_tol: float,
) -> dict[str, Any]:
  """Runs experiments/peers/bench_eval_worker.py (`peer` at `budget`); its reply and arrays."""
  out = exchange / f'{peer}_{budget}.npz'
  cmd = [peer_python, str(PEER_SCRIPT), '--dir', str(exchange), '--out', str(out)]
  cmd += ['--peer', peer, '--norm', norm, '--eps', repr(float(eps)), '--seed', str(seed)]
  cmd += ['--threads', str(threads), '--batch_size', str(batch_size)]
  cmd += ['--logits_tol', repr(float(logits_tol))]
  as_shipped = {'autoattack': 'standard', 'torchattacks': 'torchattacks'}[peer]
  if budget != as_shipped:
    cmd += ['--budgets', json.dumps(BUDGETS[budget])]
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
  if proc.returncode != 0:
    raise SystemExit(
      f'the peer ({" ".join(cmd[:2])} --peer {peer}) failed with exit code {proc.returncode}; '
      'see its messages above'
    )
  reply = json.loads(proc.stdout.strip().splitlines()[-1])
  with np.load(out) as f:
    reply.update({k: f[k] for k in f.files})
  return reply


# ------------------------------------------------------------------------- report


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, int]:
  """Counts of final flags bool[N] (a, b): robust in both, only in a, only in b, neither."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  return {
    'both': int(np.sum(a & b)),
    'only_first': int(np.sum(a & ~b)),
    'only_second': int(np.sum(~a & b)),
    'neither': int(np.sum(~a & ~b)),
  }


def compare(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
  """The per-example agreement of two report rows' flags bool[N, 5] (after every attack)."""
  fa, fb = first['flags'], second['flags']
  final_a, final_b = first['robust_final'], second['robust_final']
  return {
    'first': first['label'],
    'second': second['label'],
    'counts': agreement(final_a, final_b),
    'same_after_each_attack': {s: int(np.sum(fa[:, i] == fb[:, i])) for i, s in enumerate(STAGES)},
    'only_first_examples': [int(i) for i in np.flatnonzero(final_a & ~final_b)],
    'only_second_examples': [int(i) for i in np.flatnonzero(~final_a & final_b)],
    'difference_points': round(first['accuracy']['square'] - second['accuracy']['square'], 2),
  }


def valid_adversarial(
  x: np.ndarray, x_adv: np.ndarray, *, norm: str, eps: float, tol: float = 1e-5
) -> np.ndarray:
  """bool[N]: x_adv lies in [0, 1] and within eps (+tol) of x in the given norm."""
  d = (x_adv - x).reshape(len(x), -1).astype(np.float64)
  dist = np.abs(d).max(axis=1) if norm == 'linf' else np.linalg.norm(d, axis=1)
  flat = x_adv.reshape(len(x), -1)
  return (dist <= eps + tol) & np.all((flat >= 0) & (flat <= 1), axis=1)


def _pct(count: float, n: int) -> float:
  return round(100.0 * float(count) / n, 2)


def render(report: dict[str, Any]) -> str:
  n = report['num_examples']
  lines = [
    f'AutoAttack on the first {n} test examples of {report["workdir"]} '
    f'({report["norm"]}, eps {report["eps"]}); threads {report["threads"]}, '
    f'load average at start/end {report["loadavg_start"]} / {report["loadavg_end"]}',
    f'exported PyTorch model: max |torch - JAX logits| = {report.get("logits_max_abs_diff", "n/a")}',
    '',
    '| run | APGD / FAB steps, targets, Square queries | clean % | APGD-CE % | APGD-T % | '
    'FAB-T % | Square = robust % | attack wall s | attack CPU s | CPU util | compile s |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for row in report['rows']:
    b = row['budgets']
    acc = ' | '.join(f'{row["accuracy"][s]:.2f}' for s in STAGES)
    compile_s = f'{row["compile_wall_s"]:.1f}' if 'compile_wall_s' in row else '-'
    lines.append(
      f'| {row["label"]} | {b["apgd_steps"]} / {b["fab_steps"]}, {b["num_targets"]}, '
      f'{b["square_queries"]} | {acc} | {row["wall_s"]:.1f} | {row["cpu_s"]:.1f} | '
      f'{row["cpu_util"]:.2f} | {compile_s} |'
    )
  if report['agreement']:
    lines += [
      '',
      '| JAX run | peer run | same flag after clean / APGD-CE / APGD-T / FAB-T / Square '
      '| robust in both | JAX only | peer only | neither | robust acc. JAX - peer (points) |',
      '|---|---|---|---:|---:|---:|---:|---:|',
    ]
    for a in report['agreement']:
      c = a['counts']
      same = ' / '.join(str(a['same_after_each_attack'][s]) for s in STAGES)
      lines.append(
        f'| {a["first"]} | {a["second"]} | {same} (of {n}) | {c["both"]} | {c["only_first"]} | '
        f'{c["only_second"]} | {c["neither"]} | {a["difference_points"]:+.2f} |'
      )
    for a in report['agreement']:
      lines.append(
        f'{a["first"]} vs {a["second"]}: robust only for JAX: examples '
        f'{a["only_first_examples"] or "none"}; robust only for the peer: examples '
        f'{a["only_second_examples"] or "none"}'
      )
  for row in report['rows']:
    for k in ('clean_prediction_mismatches', 'invalid_adversarial', 'robust_rescored_by_jax'):
      if k in row:
        lines.append(f'{row["label"]}: {k.replace("_", " ")} = {row[k]}')
  if 'pipeline_check' in report:
    lines.append(f'pipeline evaluation check: {report["pipeline_check"]}')
  lines += [''] + report['verdicts']
  return '\n'.join(lines)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
  """Each like-for-like target (JAX and a peer at the same budgets): robust accuracy and time."""
  out = []
  for jr in (r for r in rows if r['side'] == 'jax'):
    for pr in (r for r in rows if r['side'] != 'jax' and r['budget'] == jr['budget']):
      target = TARGET_POINTS[pr['side']]
      diff = jr['accuracy']['square'] - pr['accuracy']['square']
      total = jr['wall_s'] + jr['compile_wall_s']
      ran = pr['budgets']
      peer = {k: ran[k] for k in ('apgd_steps', 'fab_steps', 'num_targets', 'square_queries')}
      if peer != jr['budgets'] or ran['apgdt_steps'] != ran['apgd_steps']:
        out.append(f'{pr["label"]}: NOT like for like, the peer ran {ran}, JAX {jr["budgets"]}')
      out.append(
        f'budget {jr["budget"]!r}: robust accuracy JAX {jr["accuracy"]["square"]:.2f}% vs '
        f'{pr["side"]} {pr["accuracy"]["square"]:.2f}% ({diff:+.2f} points; target within '
        f'{target}: {"met" if abs(diff) <= target else "NOT met"}); attack wall time JAX '
        f'{jr["wall_s"]:.1f} s ({total:.1f} s with compilation) vs {pr["wall_s"]:.1f} s: '
        f'{pr["wall_s"] / max(jr["wall_s"], 1e-9):.2f}x, with compilation '
        f'{pr["wall_s"] / max(total, 1e-9):.2f}x; CPU time {jr["cpu_s"]:.1f} s vs '
        f'{pr["cpu_s"]:.1f} s'
      )
  return out


def pipeline_check(workdir: Path, flags_jax: np.ndarray, fingerprint: str, settings: dict) -> str:
  """Compares JAX `standard` flags bool[N, 5] with the pipeline's evaluation of the same examples."""
  results = workdir / 'evaluate' / 'results'
  loaded = evaluate.load_flags(results)
  if loaded is None:
    return f'skipped (no evaluated batches in {results})'
  saved, index, flags = loaded
  wanted = {**settings, 'model_fingerprint': fingerprint}
  diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
  if 'autoattack_budgets' in saved:
    diff['autoattack_budgets'] = (saved['autoattack_budgets'], 'standard')
  if diff:
    return f'skipped (the pipeline evaluated with other settings: {diff})'
  names = saved['stages']
  cols = [names.index(s) for s in STAGES[1:]]
  n = len(flags_jax)
  keep = index < n
  if keep.sum() == 0:
    return 'skipped (no overlap)'
  ours = flags_jax[index[keep]][:, 1:]
  same = np.all(ours == flags[keep][:, cols], axis=1)
  return f'{int(same.sum())}/{int(keep.sum())} examples have the same flags after every attack'


# --------------------------------------------------------------------------- main


def _loadavg() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def jax_row(
  budget: str, res: dict[str, Any], x: np.ndarray, *, norm: str, eps: float, threads: int
):
  """The report row of a `run_jax` result."""
  flags = res['robust']
  broken_invalid = ~valid_adversarial(x, res['x_adv'], norm=norm, eps=eps) & ~flags[:, -1]
  return {
    'side': 'jax',
    'budget': budget,
    'label': f'JAX ({budget})',
    'budgets': res['budgets'],
    'accuracy': {s: _pct(flags[:, i].sum(), len(x)) for i, s in enumerate(STAGES)},
    'flags': flags,
    'robust_final': flags[:, -1],
    **{k: res[k] for k in ('wall_s', 'cpu_s', 'compile_wall_s', 'compile_cpu_s')},
    'cpu_util': res['cpu_s'] / max(res['wall_s'] * threads, 1e-9),
    'num_devices': res['num_devices'],
    'rows_per_call': res['batch_size'],
    'chunk_size': res['chunk_size'],
    'invalid_adversarial': int(broken_invalid.sum()),
  }


def peer_row(
  peer: str,
  budget: str,
  rep: dict[str, Any],
  x: np.ndarray,
  y: np.ndarray,
  clean: np.ndarray,
  jax_logits_fn: Callable[[np.ndarray], np.ndarray],
  *,
  norm: str,
  eps: float,
  threads: int,
) -> dict[str, Any]:
  """The report row of a peer reply; an example counts as broken only by a valid point."""
  x_adv = np.ascontiguousarray(rep['x_adv_nchw'].transpose(0, 2, 3, 1))
  valid = valid_adversarial(x, x_adv, norm=norm, eps=eps)
  flags = np.asarray(rep['flags'], bool) | ~valid[:, None]  # bool[N, 5], after each attack
  flags[:, 0] = rep['clean_logits'].argmax(-1) == y
  robust_final = flags[:, -1]
  if np.any(robust_final != ((rep['adv_logits'].argmax(-1) == y) | ~valid)):
    log(f'  note: the flags of {peer} disagree with its returned images on some examples')
  rescored = jax_logits_fn(x_adv).argmax(-1) == y
  return {
    'side': peer,
    'budget': budget,
    'label': f'{peer} ({budget})',
    'budgets': rep['budgets'],
    'accuracy': {s: _pct(flags[:, i].sum(), len(x)) for i, s in enumerate(STAGES)},
    'attack_wall_s': rep['attack_wall_s'],
    'flags': flags,
    'robust_final': robust_final,
    'wall_s': rep['wall_s'],
    'cpu_s': rep['cpu_s'],
    'cpu_util': rep['cpu_s'] / max(rep['wall_s'] * threads, 1e-9),
    'torch_threads': rep['threads'],
    'versions': rep['versions'],
    'clean_prediction_mismatches': int(np.sum(flags[:, 0] != clean)),
    'invalid_adversarial': int(np.sum(~valid)),
    'robust_rescored_by_jax': int(np.sum(rescored | ~valid)),
  }


def write_exchange(exchange: Path, model: Any, variables: Any, image_shape, x, y, logits) -> None:
  """The peer's inputs: model.json, model.npz (state_dict), inputs.npz (NCHW, labels, logits)."""
  export.write_model(exchange, model, variables, image_shape)
  x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
  export.save_npz(exchange / 'inputs.npz', x_nchw=x_nchw, y=y.astype(np.int64), jax_logits=logits)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark; prints the tables and returns the report (also written to --out)."""
  args = parse_args(argv)
  cores = pin_cpus(args.threads)  # before JAX starts its backend
  threads = len(cores)
  if args.cpu_devices:
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  peer_python = Path(args.peer_python or peers.python())
  if args.peers and not peer_python.exists():
    raise SystemExit(f'{peers.missing_venv_message(peer_python)}; or pass --peers= (JAX only)')
  workdir = Path(args.workdir).expanduser()
  loadavg_start = _loadavg()
  config = load_config(workdir)
  norm, eps, seed = config.attack.norm, float(config.attack.eps), int(config.seed)
  x, y, split = load_test_examples(config, workdir, args.num_examples)
  model, variables = restore_model(config, workdir, split.image_shape, args.allow_unfinished)
  batch_size = args.batch_size or config.eval.batch_size
  chunk = config.eval.autoattack_chunk_size if args.chunk_size < 0 else args.chunk_size
  log(
    f'jax {jax.__version__}, {jax.device_count()} devices, {threads} cores {cores}; '
    f'{len(x)} examples of {split.name}:{split.split}, {norm} eps {eps}, batch {batch_size}'
  )
  report: dict[str, Any] = {
    'workdir': str(workdir),
    'num_examples': len(x),
    'norm': norm,
    'eps': eps,
    'seed': seed,
    'threads': threads,
    'cores': cores,
    'batch_size': batch_size,
    'loadavg_start': loadavg_start,
    'machine': {'cpu_count': os.cpu_count(), 'platform': platform.platform()},
    'jax_version': jax.__version__,
    'argv': list(sys.argv[1:] if argv is None else argv),
    'rows': [],
    'agreement': [],
  }
  jit_logits = jax.jit(lambda v, z: model.apply(v, z, train=False))
  logits = np.asarray(jit_logits(variables, x))  # what the exported model must reproduce
  clean = logits.argmax(-1) == y

  jax_rows, jax_flags = [], {}
  for budget in args.jax_budgets:
    log(f'=== JAX AutoAttack, budget {budget}: {BUDGETS[budget]}')
    before = _loadavg()
    res = run_jax(
      model,
      variables,
      x,
      y,
      norm=norm,
      eps=eps,
      seed=seed,
      budgets=BUDGETS[budget],
      batch_size=batch_size,
      chunk_size=chunk or None,
      mesh=parallel.make_mesh(),
    )
    if not np.array_equal(res['robust'][:, 0], clean):
      raise RuntimeError('the JAX clean flags disagree with the clean logits')
    row = jax_row(budget, res, x, norm=norm, eps=eps, threads=threads)
    row['loadavg_before'] = before
    log(f'  {row["label"]}: {row["accuracy"]}, {row["wall_s"]:.1f} s')
    jax_rows.append(row)
    jax_flags[budget] = res['robust']
  report['rows'] += jax_rows
  if 'standard' in jax_flags:
    report['pipeline_check'] = pipeline_check(
      workdir,
      jax_flags['standard'],
      margins.model_fingerprint(variables),
      {'norm': norm, 'eps': eps, 'seed': seed},
    )
    log(f'pipeline evaluation check: {report["pipeline_check"]}')

  out_dir = Path(args.out) if args.out else None
  runs = [('autoattack', b) for b in args.autoattack_budgets if 'autoattack' in args.peers]
  runs += [('torchattacks', b) for b in args.peer_budgets if 'torchattacks' in args.peers]
  if not runs:
    log('no --peers: the PyTorch side is skipped')
  else:
    with tempfile.TemporaryDirectory(prefix='bench_eval_') as tmp:
      exchange = out_dir / 'exchange' if out_dir else Path(tmp)
      write_exchange(exchange, model, variables, split.image_shape, x, y, logits)
      for peer, budget in runs:
        log(f'=== {peer} AutoAttack, budget {budget} (peer: {peer_python})')
        before = _loadavg()
        rep = run_peer(
          str(peer_python),
          exchange,
          peer,
          budget,
          eps=eps,
          norm=norm,
          seed=seed,
          threads=threads,
          batch_size=batch_size,
          logits_tol=args.logits_tol,
        )
        report['logits_max_abs_diff'] = rep['logits_max_abs_diff']
        report['peer_versions'] = rep['versions']
        row = peer_row(
          peer,
          budget,
          rep,
          x,
          y,
          clean,
          lambda z: np.asarray(jit_logits(variables, z)),
          norm=norm,
          eps=eps,
          threads=threads,
        )
        row['loadavg_before'] = before
        log(f'  {row["label"]}: {row["accuracy"]}, {row["wall_s"]:.1f} s')
        report['rows'].append(row)
        report['agreement'] += [compare(jr, row) for jr in jax_rows]

  report['verdicts'] = verdicts(report['rows'])
  report['loadavg_end'] = _loadavg()
  text = render(report)
  print(text, flush=True)
  flags = {f'jax_{b}': f for b, f in jax_flags.items()}
  for row in report['rows']:
    final, all_flags = row.pop('robust_final'), row.pop('flags')
    row['robust_count'] = int(np.sum(final))
    if row['side'] != 'jax':
      flags[f'{row["side"]}_{row["budget"]}'] = all_flags
  if out_dir is not None:
    export.save_npz(out_dir / 'flags.npz', **flags)
    artifacts.write_json(out_dir / 'bench_eval.json', report)
    artifacts.write_text(out_dir / 'bench_eval.md', text + '\n')
    log(f'wrote bench_eval.json, bench_eval.md and flags.npz to {out_dir}')
  return report


if __name__ == '__main__':
  main()
