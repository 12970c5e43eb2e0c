"""DeepFool and adversarial-training steps in JAX against the PyTorch peers, same run.

The models (the peer benchmark's CIFAR small CNN and PreAct ResNet-18, random init,
BatchNorm statistics of the inputs) and 256 uniform random 32x32x3 inputs are exported by
experiments/peers/export.py into `--artifacts` (done here when the folder lacks them). Both
sides time on exactly those weights and inputs; the PyTorch side runs, alternating with
ours, in a worker process of the peer virtualenv (experiments/peers/bench_attacks_worker.py,
with `--peers`; see docs/peers.md):

* `deepfool`: `puma_jax.attacks.deepfool` (`--norm` l2 or linf, overshoot 0.02, 50
  iterations, all 10 classes as candidates, iterates clipped to [0, 1]) against the
  peers' DeepFool (`--peer-impls`: experiments/peers/deepfool.py's `batched` and
  `chunked`, foolbox, torchattacks): samples/s, and the agreement of the margins with
  the peers' `batched` in the peers' definition (||clip(final iterate) - x||_p, overshoot
  included, i.e. ||perturbation||_p);
* `train`: our real train step (`puma_jax.train.make_jit_train_step`: jit, state
  replicated and donated, batch split over the ('data',) mesh) for PGD-AT and
  TRADES, configured like the peers' steps (Linf eps 8/255, 10 steps of 2/255,
  SGD lr 0.1 momentum 0.9 weight decay 5e-4, TRADES beta 6), against the peers'
  steps (experiments/peers/train_steps.py) at batch 128: examples/s, examples per
  CPU-second;
* `conv_grads`: each conv of the models at the train batch, forward against its
  kernel gradient by JAX's rule and by `layers.conv2d` (GFLOP/s of CPU time).

Every timed run records its CPU utilisation; rates are also given as a fraction of
the FLOP floor: the conv/matmul FLOPs of the model's forward pass (counted from its
jaxpr; a backward pass to the input counted as one forward, a full backward as two) at
the GEMM peak.

Setup (once), then the benchmark (about 15 minutes on 2 quiet cores):

  bash experiments/peers/setup_venv.sh        # the peer virtualenv, see docs/peers.md
  PYTHONPATH=. python experiments/bench_attacks.py --peers \\
      [--sections deepfool,train,conv_grads] [--models small_cnn,preact_resnet18]
"""

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import peers, step_profile
from experiments.peers import export
from puma_jax import config_base, models, parallel, steps, train
from puma_jax.attacks import deepfool
from puma_jax.models import layers

# The peer models as configurations of ours.
MODEL_KWARGS = export.BENCH_MODELS
DEEPFOOL = dict(num_candidates=10, overshoot=0.02, max_iter=50, clip=(0.0, 1.0))
PEER_IMPLS = ('batched', 'chunked', 'foolbox', 'torchattacks')
NUM_CLASSES = 10
SECTIONS = ('deepfool', 'train', 'conv_grads')
CORES = len(os.sched_getaffinity(0))  # what this process may run on (taskset included)


def log(*a):
  print(f'[{time.strftime("%H:%M:%S")}]', *a, flush=True)


class Peer:
  """The peer worker subprocess (PyTorch in the peer virtualenv)."""

  def __init__(self, python: str, artifacts: str, threads: int):
    worker = str(peers.HERE / 'bench_attacks_worker.py')
    self.proc = subprocess.Popen(
      [
        python,
        worker,
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
  return out, {'wall_s': wall, 'cpu_util': cpu / (wall * CORES)}


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


def _dot_flops(eqn) -> int:
  (contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  return 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in contract]))


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval.shape  # HWIO
  return 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod(rhs[:-1]))


def model_flops(name: str) -> dict[str, float]:
  """Per-example conv/matmul FLOPs of the model (2 per multiply-add) at batch 1.

  The forward pass is counted from its jaxpr; a backward pass to the input only is
  counted as one forward pass and a full backward (parameters and activations) as two,
  the usual rule, which the training-step counts build on:
  PGD-AT = 10 (fwd + bwd_in) + fwd + bwd_full; TRADES = fwd + 10 (fwd + bwd_in) + 2 fwd +
  2 bwd_full (the clean softmax, the attack, the clean and adversarial passes).
  """
  model = models.create(name, num_classes=NUM_CLASSES, **MODEL_KWARGS[name])
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x).jaxpr
  fwd = sum(_conv_flops(e) for e in _conv_eqns(jaxpr)) + sum(
    _dot_flops(e) for e in _dot_eqns(jaxpr)
  )
  f, bi, bf = fwd, fwd, 2 * fwd
  return {
    'fwd': f,
    'bwd_input_only': bi,
    'bwd_params_and_activations': bf,
    'pgd_at_step_flops_per_example': 10 * (f + bi) + f + bf,
    'trades_step_flops_per_example': f + 10 * (f + bi) + 2 * f + 2 * bf,
  }


def floor_rate(iters: np.ndarray, flops: dict, peak_gflops: float) -> float:
  """Samples/s at the GEMM peak for the DeepFool floor (JAX's iteration counts)."""
  it = iters.astype(np.float64)
  total = np.sum((it + 1) * flops['fwd'] + it * (NUM_CLASSES - 1) * flops['bwd_input_only'])
  return len(it) / (total / (peak_gflops * 1e9))


def load_model(name, art):
  """(Flax module, variables) of the exported model `name` (its PyTorch state_dict)."""
  kw = MODEL_KWARGS[name]
  model = models.create(name, num_classes=NUM_CLASSES, **kw)
  path = os.path.join(art, name, 'model.npz')
  return model, models.import_torch_state_dict(name, path, **kw)


def bench_deepfool(name, args, peer, peak, flops):
  art = args.artifacts
  model, variables = load_model(name, art)
  x = np.load(os.path.join(art, 'inputs.npz'))['x_nhwc'][: args.n]
  with np.load(os.path.join(art, name, 'reference.npz')) as f:
    labels, ref_logits = f['labels'][: args.n].astype(np.int32), f['logits'][: args.n]
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  logits_diff = float(np.abs(np.asarray(apply(variables, x)) - ref_logits).max())
  log(
    f'=== {name}: max |logits after the PyTorch round trip - exported logits| = {logits_diff:.1e}'
  )

  out = {'logits_max_abs_diff': logits_diff, 'jax': {}, 'peer': {}, 'norm': args.norm}
  if peer is not None:
    out['peer_logits_max_abs_diff'] = peer(cmd='load', model=name)['logits_max_abs_diff']
    log(f'  max |PyTorch logits - JAX logits| = {out["peer_logits_max_abs_diff"]:.1e}')
  x_dev, y_dev = jnp.asarray(x), jnp.asarray(labels)
  jax_fns = {}
  num_devices = jax.device_count()
  for bs in args.batch_sizes:

    def one_device(x, y, v, bs=bs):
      return deepfool(
        lambda z: model.apply(v, z, train=False), x, y, batch_size=bs, norm=args.norm, **DEEPFOOL
      )

    variants = {f'jax_b{bs}': (jax.jit(one_device), (x_dev, y_dev, variables))}
    if num_devices > 1 and args.n % num_devices == 0:
      # The margin stage's program: every device runs its own DeepFool loop on its slice.
      mesh = parallel.make_mesh(jax.devices())
      sharded = parallel.data_sharding(mesh)
      variants[f'jax_b{bs}_d{num_devices}'] = (
        jax.jit(parallel.per_device(one_device, mesh, num_batched_args=2)),
        (
          jax.device_put(x, sharded),
          jax.device_put(labels, sharded),
          parallel.replicate(variables, mesh),
        ),
      )
    for key, (fn, fn_args) in variants.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*fn_args))  # compile + one untimed run
      log(f'  {key}: compiled and warmed up in {time.perf_counter() - t0:.1f} s')
      jax_fns[key] = (fn, fn_args)

  runs = {key: [] for key in jax_fns}
  runs.update({f'peer_{impl}': [] for impl in (args.peer_impls if peer else [])})
  results = {}
  for rep in range(args.repeats):  # interleaved: JAX, peer, JAX, peer, ...
    for key, (fn, fn_args) in jax_fns.items():
      res, t = timed(lambda fn=fn, fn_args=fn_args: fn(*fn_args))
      runs[key].append(t)
      results[key] = res
      log(f'  rep {rep} {key}: {args.n / t["wall_s"]:.2f} samples/s (cpu {t["cpu_util"]:.2f})')
    for impl in args.peer_impls if peer else []:
      t = peer(cmd='deepfool', model=name, impl=impl, n=args.n, norm=args.norm)
      results[f'peer_{impl}'] = t.pop('margins')
      iterations = t.pop('iterations', None)
      if impl == 'batched' or (impl == 'chunked' and 'ref_margins' not in out):
        out['ref_impl'], out['ref_margins'] = f'peer_{impl}', results[f'peer_{impl}']
        out['ref_iterations'] = iterations
      runs[f'peer_{impl}'].append(t)
      log(
        f'  rep {rep} peer {impl}: {args.n / t["wall_s"]:.2f} samples/s (cpu {t["cpu_util"]:.2f})'
      )

  jax_iters = np.asarray(results[next(iter(jax_fns))].iterations)
  floor = floor_rate(jax_iters, flops, peak)
  ref_margins, ref_iters = out.pop('ref_margins', None), out.pop('ref_iterations', None)
  for key, rs in runs.items():
    row = summarize(rs, args.n)
    row['fraction_of_floor'] = row['rate_median'] / floor
    if key.startswith('jax'):
      res = results[key]
      pert = np.asarray(res.perturbation, np.float64).reshape(args.n, -1)
      peer_def = np.linalg.norm(pert, axis=1) if args.norm == 'l2' else np.abs(pert).max(axis=1)
      if ref_margins is not None:
        row['agreement_vs_peer'] = agreement(ref_margins, peer_def)
      if ref_iters is not None:
        row['iterations_equal_frac'] = float(np.mean(np.asarray(res.iterations) == ref_iters))
      row['converged_frac'] = float(np.mean(res.converged))
      row['margin_median'] = float(np.median(res.margin))
      out['jax'][key] = row
    else:
      if ref_margins is not None:
        row['agreement_vs_peer'] = agreement(ref_margins, results[key])
      out['peer'][key] = row
  out['floor_samples_per_s'] = floor
  return out


# The peers' training steps (../shared/peers/README.md, "Adversarial-training steps"):
# Linf eps 8/255, 10 steps of 2/255 (0.25 relative), SGD lr 0.1, momentum 0.9, weight decay
# 5e-4, TRADES beta 6, no label smoothing. Everything else is our config schema's default.
TRAIN_OVERRIDES = {
  'attack.norm': 'linf',
  'attack.eps': 8 / 255,
  'attack.num_steps': 10,
  'attack.step_size': 0.25,
  'train.trades_beta': 6.0,
  'train.label_smoothing': 0.0,
  'train.learning_rate': 0.1,
  'train.momentum': 0.9,
  'train.nesterov': False,
  'train.weight_decay': 5e-4,
  'train.warmup_steps': 0,
  'train.num_steps': 100_000,
}
TRAIN_KINDS = ('pgd_at', 'trades')
# Work our step does that the peers' does not, as a fraction of the peers' step FLOPs
# (conv/matmul only): PGD-AT's clean-accuracy metric runs one eval-mode forward of the
# clean batch. Both steps also keep an EMA of the weights and BatchNorm statistics and
# check the loss and gradients for non-finite values (elementwise, no FLOPs counted).
EXTRA_FORWARDS = {'pgd_at': 1, 'trades': 0}


def train_config(kind: str, batch_size: int):
  """Our config schema (puma_jax.config_base) set up like the peers' `kind` step."""
  config = config_base.get_base_config()
  for path, value in {
    **TRAIN_OVERRIDES,
    'train.loss': kind,
    'train.batch_size': batch_size,
  }.items():
    section, field = path.split('.')
    config[section][field] = value
  return config


def train_step_rows(name, args, peer, flops):
  """The real JAX train step (puma_jax.train.make_jit_train_step) and the peers' steps.

  PGD-AT and TRADES on the exported weights and the first `--train-batch` inputs and
  labels, every example with eps 8/255. Our step is jitted as in training: the state
  replicated on the mesh and donated, the batch split over its 'data' axis. Each timed
  call is one step (compiled and warmed up first); JAX and peer steps alternate.
  """
  model, variables = load_model(name, args.artifacts)
  mesh = parallel.make_mesh(jax.devices()[: args.mesh_devices or None])
  inputs = np.load(os.path.join(args.artifacts, 'inputs.npz'))
  b = args.train_batch
  batch = {
    'image': inputs['x_nhwc'][:b],
    'label': inputs['train_labels'][:b].astype(np.int32),
    'index': np.arange(b, dtype=np.int32),
    'source': np.zeros(b, np.int32),
    'eps': np.full(b, 8 / 255, np.float32),
  }
  batch = parallel.shard_batch(batch, mesh)
  rng = jax.random.key(0)

  jit_steps, states = {}, {}
  for kind in TRAIN_KINDS:
    config = train_config(kind, b)
    tx, schedule = train.optimizer_from_config(config)
    state = steps.create_train_state(jax.random.key(0), model, tx, batch['image'].shape[1:])
    stats = variables.get('batch_stats', {})
    state = state.replace(
      params=variables['params'],
      batch_stats=stats,
      opt_state=tx.init(variables['params']),
      ema_params=variables['params'],
      ema_batch_stats=stats,
    )
    states[kind] = parallel.replicate(state, mesh)
    jit_steps[kind] = train.make_jit_train_step(config, model, tx, schedule, mesh)
    t0 = time.perf_counter()
    states[kind], metrics = jit_steps[kind](states[kind], batch, rng)  # compile + one step
    jax.block_until_ready(metrics)
    log(
      f'  jax {kind} on {parallel.num_devices(mesh)} device(s): compiled and warmed up in '
      f'{time.perf_counter() - t0:.1f} s (loss {float(metrics["loss"]):.3f})'
    )

  runs = {f'{who}_{kind}': [] for kind in TRAIN_KINDS for who in ('jax', 'peer')}
  for rep in range(args.train_repeats):  # interleaved: JAX, peer, JAX, peer, ...
    for kind in TRAIN_KINDS:

      def one_step(kind=kind):
        states[kind], metrics = jit_steps[kind](states[kind], batch, rng)
        return metrics

      _, t = timed(one_step)
      runs[f'jax_{kind}'].append(t)
      log(f'  rep {rep} jax {kind}: {b / t["wall_s"]:.2f} examples/s (cpu {t["cpu_util"]:.2f})')
      if peer is not None:
        t = peer(cmd='train', model=name, kind=kind, batch=b)
        runs[f'peer_{kind}'].append(t)
        log(f'  rep {rep} peer {kind}: {b / t["wall_s"]:.2f} examples/s (cpu {t["cpu_util"]:.2f})')

  if args.train_breakdown:
    # The inner maximisation alone, jitted on its own (same inputs, radii and settings);
    # the rest of the step (train-mode passes, weight gradients, SGD, EMA) is the difference.
    eval_vars = jax.device_get(states['pgd_at'].variables())
    for kind in TRAIN_KINDS:
      attack = jax.jit(
        functools.partial(
          steps.adversarial_inputs,
          lambda x: model.apply(eval_vars, x, train=False),
          loss=kind,
          norm='linf',
          num_steps=10,
          step_size=0.25,
        )
      )
      jax.block_until_ready(attack(rng, batch))
      runs[f'jax_{kind}_attack_only'] = [
        timed(lambda attack=attack: attack(rng, batch))[1] for _ in range(args.train_repeats)
      ]
      log(f'  jax {kind} attack only: {b / runs[f"jax_{kind}_attack_only"][0]["wall_s"]:.2f}/s')

  rows = {'mesh_devices': parallel.num_devices(mesh)}
  if args.train_profile:
    # One more step of each kind under jax.profiler: where its threads' time goes.
    for kind in TRAIN_KINDS:
      profile, (states[kind], _) = step_profile.profile_call(
        jit_steps[kind], states[kind], batch, rng
      )
      profile['step_gflop_counted'] = b * flops[f'{kind}_step_flops_per_example'] / 1e9
      rows[f'jax_{kind}_profile'] = profile
      log(
        f'  jax {kind} profiled: {profile["matmul_thread_s"]:.1f} thread-s in conv/matmul '
        f'kernels ({profile["matmul_gflop"]:.0f} GFLOP), {profile["other_thread_s"]:.1f} elsewhere'
      )
  for key, rs in runs.items():
    if not rs:
      continue
    kind = key.split('_', 1)[1].removesuffix('_attack_only')
    step_flops = flops[f'{kind}_step_flops_per_example']
    row = summarize(rs, b)
    row['floor_examples_per_s'] = args.peak_gflops * 1e9 / step_flops
    row['fraction_of_floor'] = row['rate_median'] / row['floor_examples_per_s']
    # Examples per second of CPU time the process actually got: the comparison that
    # survives other jobs on the machine (see the README's DeepFool section).
    cores = CORES if key.startswith('jax') else args.threads
    row['examples_per_cpu_s'] = [b / (r['wall_s'] * r['cpu_util'] * cores) for r in rs]
    if key == f'jax_{kind}':
      row['extra_flops_fraction'] = EXTRA_FORWARDS[kind] * flops['fwd'] / step_flops
    rows[key] = row
  return rows


def _eqns(jaxpr, primitive: str):
  """The `primitive` equations of a jaxpr, nested ones (custom_vjp, pjit) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          yield from _eqns(sub, primitive)


def _conv_eqns(jaxpr):
  return _eqns(jaxpr, 'conv_general_dilated')


def _dot_eqns(jaxpr):
  return _eqns(jaxpr, 'dot_general')


def _kernel_grad_fn(conv):
  """jit((x, kernel, g) -> d<g, conv(x, kernel)>/d kernel)."""
  return jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])


def conv_grad_rows(name, args):
  """Kernel gradients of each distinct conv of the model at the train batch, two ways.

  JAX's own rule (`jax.vjp` of `lax.conv_general_dilated` with respect to the kernel)
  against `layers.conv2d`'s (on CPU: summed over batch chunks, 1x1 kernels as a matrix
  product), each beside the forward conv. GFLOP/s from the process CPU time, best of
  `--train-repeats`, so other jobs on the machine distort it less than wall time.
  """
  kw = MODEL_KWARGS[name]
  model = models.create(name, num_classes=NUM_CLASSES, **kw)
  b = args.train_batch
  x = jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x).jaxpr
  shapes = {}
  for eqn in _conv_eqns(jaxpr):
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    strides = tuple(eqn.params['window_strides'])
    padding = tuple(tuple(p) for p in eqn.params['padding'])
    shapes.setdefault((lhs, rhs, strides, padding), 0)
    shapes[(lhs, rhs, strides, padding)] += 1

  def cpu_best(fn, *a):
    jax.block_until_ready(fn(*a))
    best = float('inf')
    for _ in range(args.train_repeats):
      c0 = time.process_time()
      jax.block_until_ready(fn(*a))
      best = min(best, time.process_time() - c0)
    return best

  rows = []
  rs = np.random.default_rng(0)
  for (lhs, rhs, strides, padding), count in shapes.items():
    xs = jnp.asarray(rs.standard_normal(lhs, np.float32))
    kernel = jnp.asarray(rs.standard_normal(rhs, np.float32))
    conv = functools.partial(
      jax.lax.conv_general_dilated,
      window_strides=strides,
      padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    g = jnp.asarray(rs.standard_normal(conv(xs, kernel).shape, np.float32))
    flops = 2 * g.size * rhs[0] * rhs[1] * rhs[2]
    ours = functools.partial(layers.conv2d, strides=strides, padding=padding)
    t = {
      'forward': cpu_best(jax.jit(conv), xs, kernel),
      'kernel_grad_jax_rule': cpu_best(_kernel_grad_fn(conv), xs, kernel, g),
      'kernel_grad_layers': cpu_best(_kernel_grad_fn(ours), xs, kernel, g),
    }
    row = {
      'input': lhs,
      'kernel': rhs,
      'strides': strides,
      'padding': padding,
      'count': count,
      'gflop': flops / 1e9,
    }
    row.update({f'{k}_cpu_s': v for k, v in t.items()})
    rows.append(row)
    log(
      f'  {name} conv {lhs} x {rhs} stride {strides}: GFLOP/s (CPU time) '
      + ', '.join(f'{k} {flops / v / 1e9:.0f}' for k, v in t.items())
    )
  return rows


def _rate(row) -> str:
  return f'{row["rate_median"]:.2f} [{row["rate_worst"]:.2f}, {row["rate_best"]:.2f}]'


def render_deepfool(report) -> list[str]:
  lines = [
    '| model | norm | implementation | samples/s median | [worst, best] | % of floor '
    '| min CPU util | median rel diff vs the reference | within atol 3e-4 rtol 1e-3 |',
    '|---|---|---|---:|---|---:|---:|---:|---:|',
  ]
  for name, d in report['deepfool'].items():
    for key, row in {**d['jax'], **d['peer']}.items():
      a = row.get('agreement_vs_peer')
      agree = '- | -' if a is None else f'{a["median_rel"]:.1e} | {100 * a["frac_allclose"]:.1f}%'
      if key == d.get('ref_impl'):
        agree = '(reference) | '
      lines.append(
        f'| {name} | {d["norm"]} | {key} | {row["rate_median"]:.2f} | '
        f'[{row["rate_worst"]:.2f}, {row["rate_best"]:.2f}] | '
        f'{100 * row["fraction_of_floor"]:.0f}% | {row["cpu_util_min"]:.2f} | {agree} |'
      )
    lines.append(f'| {name} | | *floor* | {d["floor_samples_per_s"]:.1f} | | 100% | | | |')
    if 'peer_logits_max_abs_diff' in d:
      lines.append(
        f'\n{name}: max |PyTorch logits - JAX logits| = {d["peer_logits_max_abs_diff"]:.1e}; '
        f'margins compared with {d.get("ref_impl", "no peer")}'
      )
    best_jax = max(r['rate_median'] for r in d['jax'].values())
    for key, row in d['peer'].items():
      lines.append(f'\n{name}: best JAX / {key} = {best_jax / row["rate_median"]:.2f}x')
  return lines


def _profile_note(name, kind, prof, batch) -> str:
  total = prof['matmul_thread_s'] + prof['other_thread_s']
  top = ', '.join(f'{k} {v:.2f}' for k, v in list(prof['other_by_kind_s'].items())[:4])
  threads = CORES
  return (
    f'{name} {kind}, one JAX step under jax.profiler: {100 * prof["matmul_thread_s"] / total:.1f}% '
    f"of its threads' busy time is in conv/matmul kernels, which execute "
    f'{prof["matmul_gflop"]:.0f} GFLOP (the analytic count is {prof["step_gflop_counted"]:.0f} for the '
    f'step) at {prof["matmul_gflops_per_thread"]:.1f} GFLOP/s per thread; the other '
    f'{prof["other_thread_s"]:.2f} thread-s (largest kinds, thread-s: {top}). With no time '
    f'outside those kernels, on {threads} threads, the step would give '
    f'{batch * threads / prof["matmul_thread_s"]:.2f} examples/s.'
  )


def render_train(report) -> list[str]:
  cfg = report['config']
  lines = [
    f'Adversarial-training steps: batch {cfg["train_batch"]}, Linf eps 8/255, 10 attack '
    'steps of 2/255, SGD lr 0.1 momentum 0.9 weight decay 5e-4, TRADES beta 6; '
    f'{cfg["train_repeats"]} timed steps each, JAX and PyTorch alternating.',
    '',
    '| model | step | JAX examples/s median [worst, best] | PyTorch examples/s | JAX / PyTorch '
    '| examples per CPU-second, JAX vs PyTorch (ratio) | % of FLOP floor, JAX / PyTorch '
    '| min CPU util, JAX / PyTorch |',
    '|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  notes = []
  for name, rows in report['train'].items():
    for kind in TRAIN_KINDS:
      j, p = rows[f'jax_{kind}'], rows.get(f'peer_{kind}')
      j_cpu = statistics.median(j['examples_per_cpu_s'])
      if p is None:
        lines.append(
          f'| {name} | {kind} | {_rate(j)} | - | - | {j_cpu:.1f} | '
          f'{100 * j["fraction_of_floor"]:.0f}% | {j["cpu_util_min"]:.2f} |'
        )
      else:
        p_cpu = statistics.median(p['examples_per_cpu_s'])
        lines.append(
          f'| {name} | {kind} | {_rate(j)} | {_rate(p)} | '
          f'{j["rate_median"] / p["rate_median"]:.2f}x | {j_cpu:.1f} vs {p_cpu:.1f} '
          f'({j_cpu / p_cpu:.2f}x) | {100 * j["fraction_of_floor"]:.0f}% / '
          f'{100 * p["fraction_of_floor"]:.0f}% | {j["cpu_util_min"]:.2f} / '
          f'{p["cpu_util_min"]:.2f} |'
        )
      if f'jax_{kind}_profile' in rows:
        notes.append(_profile_note(name, kind, rows[f'jax_{kind}_profile'], cfg['train_batch']))
      if f'jax_{kind}_attack_only' in rows:
        a_cpu = statistics.median(rows[f'jax_{kind}_attack_only']['examples_per_cpu_s'])
        notes.append(
          f'{name} {kind}: the JAX attack alone takes {100 * j_cpu / a_cpu:.0f}% of the '
          "step's CPU time, the update (train-mode passes, weight gradients, SGD, EMA) the "
          'rest (medians).'
        )
    floors = ', '.join(
      f'{kind} {rows[f"jax_{kind}"]["floor_examples_per_s"]:.1f}' for kind in TRAIN_KINDS
    )
    notes.append(
      f'{name}: FLOP floor at {report["peak_gflops"]:.0f} GFLOP/s: {floors} examples/s; '
      f'mesh of {rows["mesh_devices"]} device(s).'
    )
  extra = {
    kind: rows[f'jax_{kind}']['extra_flops_fraction']
    for rows in report['train'].values()
    for kind in TRAIN_KINDS
  }
  notes.append(
    "Our step does strictly more work than the peers': PGD-AT also runs one eval-mode "
    f'forward pass of the clean batch for its clean-accuracy metric (+{100 * extra["pgd_at"]:.1f}% '
    "of the step's FLOPs); both steps also update an EMA of the weights and BatchNorm "
    'statistics and keep the last state on a non-finite loss (elementwise work). TRADES does '
    "the same passes as the peers' (clean eval forward once, 10 attack steps, two "
    'train-mode forward and backward passes). Examples per CPU-second divide by the cores '
    'each process actually used: the fairer comparison while other jobs share the CPU.'
  )
  return lines + [''] + notes


def render_conv_grads(report) -> list[str]:
  lines = [
    'Kernel gradients of the convs at the train batch, GFLOP/s from CPU time (best of the '
    "repeats): forward conv, JAX's rule, layers.conv2d.",
    '',
    '| model | input | kernel | stride | count | forward | kernel grad, JAX rule '
    '| kernel grad, layers | speed-up |',
    '|---|---|---|---|---:|---:|---:|---:|---:|',
  ]
  for name, rows in report['conv_grads'].items():
    total_jax = total_layers = 0.0
    for r in rows:
      gf = lambda k, r=r: r['gflop'] / r[f'{k}_cpu_s']
      total_jax += r['count'] * r['kernel_grad_jax_rule_cpu_s']
      total_layers += r['count'] * r['kernel_grad_layers_cpu_s']
      lines.append(
        f'| {name} | {r["input"]} | {r["kernel"]} | {r["strides"]} | {r["count"]} | '
        f'{gf("forward"):.0f} | {gf("kernel_grad_jax_rule"):.0f} | '
        f'{gf("kernel_grad_layers"):.0f} | '
        f'{r["kernel_grad_jax_rule_cpu_s"] / r["kernel_grad_layers_cpu_s"]:.1f}x |'
      )
    lines.append(
      f'| {name} | all kernel gradients of one backward pass | | | | | '
      f'{total_jax:.2f} s | {total_layers:.2f} s | {total_jax / total_layers:.1f}x |'
    )
  return lines


def render(report) -> str:
  lines = [
    f'GEMM peak used for the floors: {report["peak_gflops"]:.0f} GFLOP/s (this run: numpy '
    f'{report["gemm"]["numpy"]:.0f}, torch {report["gemm"].get("torch", float("nan")):.0f}); '
    f'load average at the end {tuple(round(v, 1) for v in report["loadavg_end"])}',
    f'This run: {report["wall_s"]:.0f} s wall; CPU time {report["cpu_s"]["jax_process"]:.0f} s '
    f'(JAX process) + {report["cpu_s"]["peer_worker"]:.0f} s (PyTorch worker).',
  ]
  for section, fn in (
    ('deepfool', render_deepfool),
    ('train', render_train),
    ('conv_grads', render_conv_grads),
  ):
    if section in report:
      lines += ['', *fn(report)]
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    '--artifacts',
    default=str(peers.REPO / 'bench_out' / 'peer_artifacts'),
    help='folder of the exported models and inputs (experiments/peers/export.py); what it '
    'lacks is exported first',
  )
  ap.add_argument(
    '--peers',
    action='store_true',
    help='also run the PyTorch peers, in the peer virtualenv ($PUMA_PEERS_VENV, else '
    '.peers/venv; build it with `bash experiments/peers/setup_venv.sh`)',
  )
  ap.add_argument('--peer-python', help='the peer interpreter (implies --peers)')
  ap.add_argument('--norm', default='l2', choices=['l2', 'linf'], help='DeepFool norm')
  ap.add_argument('--models', default='small_cnn,preact_resnet18')
  ap.add_argument('--n', type=int, default=256)
  ap.add_argument('--batch-sizes', default='4,8', help='comma list of deepfool batch_size values')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument(
    '--peer-impls',
    default='batched,chunked',
    help=f'comma list of {",".join(PEER_IMPLS)} (torchattacks: L2 only, one example at a '
    "time); 'batched' is the reference of the margin agreement",
  )
  ap.add_argument('--threads', type=int, default=2, help='torch threads in the peer worker')
  ap.add_argument(
    '--sections',
    default=','.join(SECTIONS),
    help=f'comma list of {",".join(SECTIONS)}: DeepFool margins, the PGD-AT / TRADES train '
    'steps, and the micro-benchmark of conv kernel gradients',
  )
  # Older command lines asked for the train rows with --train; they are now a section.
  ap.add_argument('--train', action='store_true', help=argparse.SUPPRESS)
  ap.add_argument('--train-batch', type=int, default=128)
  ap.add_argument(
    '--train-repeats', type=int, default=3, help='timed train steps (and conv repeats)'
  )
  ap.add_argument(
    '--train-breakdown',
    action='store_true',
    help='also time the JAX attack alone, to split the step into attack and update',
  )
  ap.add_argument(
    '--train-profile',
    action='store_true',
    help="also run one JAX step of each kind under jax.profiler: the threads' time in "
    'conv/matmul kernels, their FLOPs and GFLOP/s, and the time elsewhere',
  )
  ap.add_argument(
    '--mesh-devices',
    type=int,
    default=0,
    help="devices of the train step's data mesh (0: all of jax.devices())",
  )
  ap.add_argument('--out', help='write the report as JSON here')
  args = ap.parse_args()
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  args.peer_impls = [i for i in args.peer_impls.split(',') if i]
  unknown = sorted(set(args.peer_impls) - set(PEER_IMPLS))
  if unknown:
    sys.exit(f'--peer-impls: unknown {unknown}; choose from {",".join(PEER_IMPLS)}')
  args.sections = [x for x in args.sections.split(',') if x] + (['train'] if args.train else [])
  unknown = sorted(set(args.sections) - set(SECTIONS))
  if unknown:
    sys.exit(f'--sections: unknown {unknown}; choose from {",".join(SECTIONS)}')
  args.models = [m for m in args.models.split(',') if m]
  unknown = sorted(set(args.models) - set(MODEL_KWARGS))
  if unknown:
    sys.exit(f'--models: unknown {unknown}; choose from {",".join(MODEL_KWARGS)}')
  if args.mesh_devices < 0 or args.mesh_devices > jax.device_count():
    sys.exit(f'--mesh-devices {args.mesh_devices}: this process has {jax.device_count()} devices')
  if args.train_batch % (args.mesh_devices or jax.device_count()):
    sys.exit(f"--train-batch {args.train_batch} must divide over the mesh's devices")
  inputs = os.path.join(args.artifacts, 'inputs.npz')
  have = os.path.exists(inputs) and len(np.load(inputs)['x_nhwc']) >= args.n
  if not have or not all(
    os.path.exists(os.path.join(args.artifacts, m, 'reference.npz')) for m in args.models
  ):
    log(f'exporting the models and {max(args.n, args.train_batch)} inputs to {args.artifacts}')
    export.write_bench_artifacts(args.artifacts, args.models, max(args.n, args.train_batch))

  peer = None
  if args.peers or args.peer_python:
    python = args.peer_python or str(peers.python())
    if not os.path.exists(python):
      sys.exit(peers.missing_venv_message(python))
    peer = Peer(python, args.artifacts, args.threads)
  t_start = time.perf_counter()
  try:
    log(f'jax {jax.__version__} on {jax.devices()}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    gemm = {'numpy': gemm_peak_numpy()}
    if peer is not None:
      gemm['torch'] = peer(cmd='gemm')['gflops']
    # A GEMM timed while other processes hold the cores reads low and inflates the
    # fractions of the floor: quote them from a quiet machine.
    args.peak_gflops = max(gemm.values())
    flops = {name: model_flops(name) for name in args.models}
    report = {'gemm': gemm, 'peak_gflops': args.peak_gflops, 'config': vars(args)}
    if 'deepfool' in args.sections:
      report['deepfool'] = {
        name: bench_deepfool(name, args, peer, args.peak_gflops, flops[name])
        for name in args.models
      }
    if 'train' in args.sections:
      log('=== train steps')
      report['train'] = {
        name: train_step_rows(name, args, peer, flops[name]) for name in args.models
      }
    if 'conv_grads' in args.sections:
      log('=== conv kernel gradients')
      report['conv_grads'] = {name: conv_grad_rows(name, args) for name in args.models}
    report['loadavg_end'] = os.getloadavg()
    report['wall_s'] = time.perf_counter() - t_start
  finally:
    if peer is not None:
      peer.close()
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  report['cpu_s'] = {
    'jax_process': time.process_time(),
    'peer_worker': children.ru_utime + children.ru_stime,
  }
  print(render(report))
  if args.out:
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(report, f, indent=1, default=float)
    os.replace(tmp, args.out)


if __name__ == '__main__':
  main()
