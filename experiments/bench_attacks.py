"""DeepFool in JAX against the PyTorch peers: same weights, same inputs, same run.

Loads the models, weights and inputs that the peer benchmark exports
(../shared/peers/peer_bench.py: weights_<model>.npz, inputs.npz, labels, margins,
iteration counts, FLOP counts in results.json), runs `puma_jax.attacks.deepfool`
(L2, overshoot 0.02, 50 iterations, 10 candidates, iterates clipped to [0, 1])
and, interleaved with it, the peers' DeepFool in a subprocess of the peer
virtualenv (experiments/bench_attacks_peer.py imports their code). It prints
samples/s side by side, the agreement of the margins in the peers' definition
(||clip(final iterate) - x||_2, overshoot included, i.e. ||perturbation||_2), the
fraction of the FLOP floor reached, and CPU utilisation of every timed run.

Setup (once), then the benchmark:

  bash ../shared/peers/setup_venv.sh /work/peers-venv
  /work/peers-venv/bin/python ../shared/peers/peer_bench.py --out /work/peers_out \\
      --impls clean --sections deepfool --repeats 1 --skip-fp64 --skip-default-usage
  PYTHONPATH=. python experiments/bench_attacks.py --artifacts /work/peers_out \\
      --peers-dir ../shared/peers --peer-python /work/peers-venv/bin/python

The adversarial-training step rows (PGD-AT, TRADES) call `puma_jax.steps` when
that module exists (see `train_step_rows`); until then the script times the JAX
attack part of those steps and the peers' whole steps, labelled as such.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from puma_jax import models
from puma_jax.attacks import deepfool, losses, pgd, trades_perturb

# The peer models as configurations of ours.
MODEL_KWARGS = {
  'small_cnn': dict(
    conv_channels=(32, 64, 128), pool_after=(False, True, True), dense_widths=(256,)
  ),
  'preact_resnet18': {},
}
DEEPFOOL = dict(norm='l2', num_candidates=10, overshoot=0.02, max_iter=50, clip=(0.0, 1.0))
NUM_CLASSES = 10


def log(*a):
  print(f'[{time.strftime("%H:%M:%S")}]', *a, flush=True)


class Peer:
  """The peer worker subprocess (PyTorch in the peer virtualenv)."""

  def __init__(self, python: str, peers_dir: str, artifacts: str, threads: int):
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bench_attacks_peer.py')
    self.proc = subprocess.Popen(
      [
        python,
        worker,
        '--peers-dir',
        peers_dir,
        '--artifacts',
        artifacts,
        '--threads',
        str(threads),
      ],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )

  def __call__(self, **req):
    self.proc.stdin.write(json.dumps(req) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'peer worker exited (code {self.proc.wait()}) on {req}')
    return json.loads(line)

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def timed(fn):
  """Runs fn once; returns (output, {'wall_s', 'cpu_util'}) with cpu_util = CPU time / (wall x cores)."""
  c0, t0 = time.process_time(), time.perf_counter()
  out = jax.block_until_ready(fn())
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return out, {'wall_s': wall, 'cpu_util': cpu / (wall * os.cpu_count())}


def summarize(runs, work):
  walls = [r['wall_s'] for r in runs]
  return {
    'rate_median': work / statistics.median(walls),
    'rate_best': work / min(walls),
    'rate_worst': work / max(walls),
    'cpu_util_min': min(r['cpu_util'] for r in runs),
    'wall_s': walls,
  }


def agreement(ref, other, rtol=1e-3, atol=3e-4):
  """The peers' agreement statistics (relative difference |a-b|/a, a the reference)."""
  ref, other = np.asarray(ref, np.float64), np.asarray(other, np.float64)
  ad = np.abs(ref - other)
  rd = ad / np.maximum(np.abs(ref), 1e-12)
  return {
    'n': len(ref),
    'median_rel': float(np.median(rd)),
    'max_rel': float(rd.max()),
    'max_abs': float(ad.max()),
    'frac_allclose': float(np.mean(ad <= atol + rtol * np.abs(ref))),
  }


def gemm_peak_numpy() -> float:
  a = np.random.default_rng(1).standard_normal((4096, 4096), np.float32)
  b = np.random.default_rng(2).standard_normal((4096, 4096), np.float32)
  a @ b
  ts = []
  for _ in range(3):
    t0 = time.perf_counter()
    a @ b
    ts.append(time.perf_counter() - t0)
  return 2 * 4096**3 / sorted(ts)[1] / 1e9


def floor_rate(iters: np.ndarray, flops: dict, peak_gflops: float) -> float:
  """Samples/s at the GEMM peak for the peers' DeepFool floor (reference iteration counts)."""
  it = iters.astype(np.float64)
  total = np.sum((it + 1) * flops['fwd'] + it * (NUM_CLASSES - 1) * flops['bwd_input_only'])
  return len(it) / (total / (peak_gflops * 1e9))


def bench_deepfool(name, args, peer, peak, recorded):
  art = args.artifacts
  kw = MODEL_KWARGS[name]
  model = models.create(name, num_classes=NUM_CLASSES, **kw)
  variables = models.import_torch_npz(name, os.path.join(art, f'weights_{name}.npz'), **kw)
  x = np.load(os.path.join(art, 'inputs.npz'))['x_nhwc'][: args.n]
  labels = np.load(os.path.join(art, f'labels_{name}.npy'))[: args.n].astype(np.int32)
  ref_logits = np.load(os.path.join(art, f'logits_{name}.npy'))[: args.n]
  ref_margins = np.load(os.path.join(art, f'margins_{name}_clean.npy'))[: args.n]
  ref_iters = np.load(os.path.join(art, f'iters_{name}_clean.npy'))[: args.n]
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  logits_diff = float(np.abs(np.asarray(apply(variables, x)) - ref_logits).max())
  log(f'=== {name}: max |logits - peer logits| = {logits_diff:.1e}')

  out = {'logits_max_abs_diff': logits_diff, 'jax': {}, 'peer': {}}
  if peer is not None:
    peer(cmd='load', model=name)
  x_dev, y_dev = jnp.asarray(x), jnp.asarray(labels)
  jax_fns = {}
  for bs in args.batch_sizes:
    fn = jax.jit(
      lambda v, x, y, bs=bs: deepfool(
        lambda z: model.apply(v, z, train=False), x, y, batch_size=bs, **DEEPFOOL
      )
    )
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, x_dev, y_dev))  # compile + one untimed run
    log(f'  jax batch_size={bs}: compiled and warmed up in {time.perf_counter() - t0:.1f} s')
    jax_fns[bs] = fn

  runs = {f'jax_b{bs}': [] for bs in args.batch_sizes}
  runs.update({f'peer_{impl}': [] for impl in (args.peer_impls if peer else [])})
  results = {}
  for rep in range(args.repeats):  # interleaved: JAX, peer, JAX, peer, ...
    for bs, fn in jax_fns.items():
      res, t = timed(lambda fn=fn: fn(variables, x_dev, y_dev))
      runs[f'jax_b{bs}'].append(t)
      results[f'jax_b{bs}'] = res
      log(f'  rep {rep} jax b={bs}: {args.n / t["wall_s"]:.2f} samples/s (cpu {t["cpu_util"]:.2f})')
    for impl in args.peer_impls if peer else []:
      t = peer(cmd='deepfool', model=name, impl=impl, n=args.n)
      results[f'peer_{impl}'] = t.pop('margins')
      runs[f'peer_{impl}'].append(t)
      log(
        f'  rep {rep} peer {impl}: {args.n / t["wall_s"]:.2f} samples/s (cpu {t["cpu_util"]:.2f})'
      )

  flops = recorded['models'][name]
  floor = floor_rate(ref_iters, flops, peak)
  for key, rs in runs.items():
    row = summarize(rs, args.n)
    row['fraction_of_floor'] = row['rate_median'] / floor
    if key.startswith('jax'):
      res = results[key]
      pert = np.asarray(res.perturbation, np.float64).reshape(args.n, -1)
      peer_def = np.linalg.norm(pert, axis=1)
      row['agreement_vs_saved_clean'] = agreement(ref_margins, peer_def)
      row['iterations_equal_frac'] = float(np.mean(np.asarray(res.iterations) == ref_iters))
      row['converged_frac'] = float(np.mean(res.converged))
      row['margin_median'] = float(np.median(res.margin))
      out['jax'][key] = row
    else:
      row['agreement_vs_saved_clean'] = agreement(ref_margins, results[key])
      out['peer'][key] = row
  out['floor_samples_per_s'] = floor
  return out


def train_step_rows(name, args, peer):
  """PGD-AT and TRADES rows. Uses puma_jax.steps when it exists (written on its own branch).

  Until then this times the JAX attack part of each step (10 steps of PGD on the
  cross-entropy / of the TRADES KL at batch `--train-batch`, eps 8/255, steps 2/255)
  and the peers' whole training steps; the two are not like for like.
  """
  try:
    from puma_jax import steps  # noqa: F401
  except ImportError:
    steps = None
  if steps is not None:
    # Hook: build the train state from the imported weights and time
    # steps.train_step for loss='pgd_at' and loss='trades' here, like the attack rows below.
    log('  puma_jax.steps exists: add its train_step rows in train_step_rows()')
  kw = MODEL_KWARGS[name]
  model = models.create(name, num_classes=NUM_CLASSES, **kw)
  variables = models.import_torch_npz(
    name, os.path.join(args.artifacts, f'weights_{name}.npz'), **kw
  )
  inputs = np.load(os.path.join(args.artifacts, 'inputs.npz'))
  xb = jnp.asarray(inputs['x_nhwc'][: args.train_batch])
  yb = jnp.asarray(inputs['train_labels'][: args.train_batch].astype(np.int32))
  eps = jnp.full((args.train_batch,), 8 / 255, jnp.float32)
  logits_fn = lambda v, z: model.apply(v, z, train=False)
  attacks = {
    'pgd_at_attack_only': jax.jit(
      lambda v, k, x, y, e: pgd(
        lambda z, t: losses.cross_entropy(logits_fn(v, z), t),
        k,
        x,
        y,
        e,
        norm='linf',
        num_steps=10,
        step_size=0.25,
      )
    ),
    'trades_attack_only': jax.jit(
      lambda v, k, x, y, e: trades_perturb(
        functools.partial(logits_fn, v), k, x, e, norm='linf', num_steps=10, step_size=0.25
      )
    ),
  }
  rows = {}
  key = jax.random.key(0)
  for kind, fn in attacks.items():
    jax.block_until_ready(fn(variables, key, xb, yb, eps))
    ts = [timed(lambda fn=fn: fn(variables, key, xb, yb, eps))[1] for _ in range(args.repeats)]
    rows[f'jax_{kind}'] = summarize(ts, args.train_batch)
    log(f'  jax {kind}: {rows[f"jax_{kind}"]["rate_median"]:.2f} examples/s')
  if peer is not None:
    for kind in ('pgd_at', 'trades'):
      ts = [
        peer(cmd='train', model=name, kind=kind, batch=args.train_batch)
        for _ in range(args.repeats)
      ]
      rows[f'peer_{kind}_full_step'] = summarize(ts, args.train_batch)
      log(
        f'  peer {kind} full step: {rows[f"peer_{kind}_full_step"]["rate_median"]:.2f} examples/s'
      )
  return rows


def render(report) -> str:
  lines = [
    f'GEMM peak used for the floors: {report["peak_gflops"]:.0f} GFLOP/s (this run: numpy '
    f'{report["gemm"]["numpy"]:.0f}, torch {report["gemm"].get("torch", float("nan")):.0f}; '
    f'recorded with the artifacts: {report["gemm"]["recorded_with_artifacts"]:.0f}); '
    f'load average at the end {tuple(round(v, 1) for v in report["loadavg_end"])}',
    '',
    '| model | implementation | samples/s median | [worst, best] | % of floor | min CPU util '
    '| median rel diff vs peer clean | within atol 3e-4 rtol 1e-3 |',
    '|---|---|---:|---|---:|---:|---:|---:|',
  ]
  for name, d in report['deepfool'].items():
    for key, row in {**d['jax'], **d['peer']}.items():
      a = row['agreement_vs_saved_clean']
      lines.append(
        f'| {name} | {key} | {row["rate_median"]:.2f} | [{row["rate_worst"]:.2f}, '
        f'{row["rate_best"]:.2f}] | {100 * row["fraction_of_floor"]:.0f}% | '
        f'{row["cpu_util_min"]:.2f} | {a["median_rel"]:.1e} | {100 * a["frac_allclose"]:.1f}% |'
      )
    lines.append(f'| {name} | *floor* | {d["floor_samples_per_s"]:.1f} | | 100% | | | |')
    best_jax = max(r['rate_median'] for r in d['jax'].values())
    for key, row in d['peer'].items():
      lines.append(f'\n{name}: best JAX / {key} = {best_jax / row["rate_median"]:.2f}x')
  for name, rows in report.get('train', {}).items():
    lines.append(f'\n| {name} train rows | examples/s median | [worst, best] |\n|---|---:|---|')
    for key, row in rows.items():
      lines.append(
        f'| {key} | {row["rate_median"]:.2f} | [{row["rate_worst"]:.2f}, {row["rate_best"]:.2f}] |'
      )
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument('--artifacts', required=True, help='output folder of peer_bench.py')
  ap.add_argument('--peers-dir', help='folder holding peer_bench.py (for the live peer runs)')
  ap.add_argument(
    '--peer-python', help='python of the peer virtualenv; omit to skip live peer runs'
  )
  ap.add_argument('--models', default='small_cnn,preact_resnet18')
  ap.add_argument('--n', type=int, default=256)
  ap.add_argument('--batch-sizes', default='4,8', help='comma list of deepfool batch_size values')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument(
    '--peer-impls', default='clean_tuned', help='comma list: clean_tuned,clean,foolbox'
  )
  ap.add_argument('--threads', type=int, default=2, help='torch threads in the peer worker')
  ap.add_argument('--train', action='store_true', help='also the PGD-AT / TRADES rows')
  ap.add_argument('--train-batch', type=int, default=128)
  ap.add_argument('--out', help='write the report as JSON here')
  args = ap.parse_args()
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  args.peer_impls = [i for i in args.peer_impls.split(',') if i]
  for f in ('inputs.npz', 'results.json'):
    if not os.path.exists(os.path.join(args.artifacts, f)):
      sys.exit(f'--artifacts {args.artifacts} lacks {f}: run peer_bench.py --out there first')
  with open(os.path.join(args.artifacts, 'results.json')) as f:
    recorded = json.load(f)

  peer = None
  if args.peer_python:
    if not args.peers_dir or not os.path.exists(os.path.join(args.peers_dir, 'peer_bench.py')):
      sys.exit('--peer-python needs --peers-dir, the folder holding peer_bench.py')
    peer = Peer(args.peer_python, args.peers_dir, args.artifacts, args.threads)
  try:
    log(f'jax {jax.__version__} on {jax.devices()}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    gemm = {'numpy': gemm_peak_numpy()}
    if peer is not None:
      gemm['torch'] = peer(cmd='gemm')['gflops']
    # A GEMM timed while other processes hold the cores reads low and would inflate the
    # fraction of the floor; the peak recorded with the artifacts bounds it from below.
    recorded_peak = recorded.get('cpu_peak', {}).get('peak_used_for_floors_gflops', 0.0)
    gemm['recorded_with_artifacts'] = recorded_peak
    report = {'gemm': gemm, 'peak_gflops': max(gemm.values()), 'config': vars(args)}
    report['deepfool'] = {
      name: bench_deepfool(name, args, peer, report['peak_gflops'], recorded)
      for name in args.models.split(',')
    }
    if args.train:
      report['train'] = {name: train_step_rows(name, args, peer) for name in args.models.split(',')}
    report['loadavg_end'] = os.getloadavg()
  finally:
    if peer is not None:
      peer.close()
  print(render(report))
  if args.out:
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(report, f, indent=1, default=float)
    os.replace(tmp, args.out)


if __name__ == '__main__':
  main()
