"""Times the accelerator programs on whatever devices JAX finds, with MFU where it applies.

The programs are the ones the pipeline runs, built from `configs/cifar10_wrn28_10.py`
(WRN-28-10 Swish, CIFAR-sized 32x32x3 inputs) on a ('data',) mesh of the devices:

  trades_step    `train.make_jit_train_step` with train.loss=trades (10 attack steps)
  pgd_at_step    the same with train.loss=pgd_at
  margins        `margins.engine.margin_program`: the margin estimator at the config's margins settings
                 (batch 1024, slots 0, 10 candidates, 50 iterations at most)
  autoattack     `autoattack.run_standard` as `evaluate` jits it (standard budgets), on
                 one batch of 512

Train steps run at batch 512 in both bfloat16 and float32 compute; their MFU is the
model FLOPs (`utilization`: the forward's cost analysis x the step's passes) over
step time x devices x the device's bf16 dense peak (none for an unknown kind: CPU).
Inputs are random images with random labels and eps 8/255; weights are a fresh
initialisation. The attacks' cost depends on the model: with random weights DeepFool
converges in a few iterations and AutoAttack's first attack breaks every example (its
labels are the model's own predictions, so that all examples are attacked), so their
rates are upper bounds for a robust model's.

  python -m experiments.accelerator_bench                    # everything, batch 512
  python -m experiments.accelerator_bench --programs trades_step --dtypes bfloat16
  python -m experiments.accelerator_bench --margin-dtypes    # bf16 vs f32 DeepFool margins
  python -m experiments.accelerator_bench --tiny             # WRN-10-1, tiny budgets (tests)

`--margin-dtypes` computes DeepFool margins of one batch with the same weights in
float32 and bfloat16 compute and prints their relative difference. `--out FILE` also
writes the results as JSON. Timings: the median of `--repeats` runs after one
untimed run, each waited for.
"""

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from puma_jax import margins, parallel, steps, train, utilization
from puma_jax.attacks import autoattack

_CONFIG = Path(__file__).resolve().parent.parent / 'configs' / 'cifar10_wrn28_10.py'
IMAGE_SHAPE = (32, 32, 3)
PROGRAMS = ('trades_step', 'pgd_at_step', 'margins', 'autoattack')
DTYPES = ('bfloat16', 'float32')


def load_config(
  *,
  tiny: bool = False,
  dtype: str = 'bfloat16',
  batch_size: int | None = None,
  model_size: tuple[int, int] | None = None,
  max_iter: int | None = None,
):
  """The DM-Improves-AT config (WRN-28-10, batch 512) in `dtype` compute.

  `tiny`: WRN-10-1, batch 8, 2 attack steps, 3 DeepFool iterations, AutoAttack budgets
  of 2 (the test's size). `batch_size` sets the train, margins and AutoAttack batch;
  `model_size` the WRN's (depth, width); `max_iter` DeepFool's iterations.
  """
  spec = importlib.util.spec_from_file_location('cifar10_wrn28_10', _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('baseline')
  config.model.dtype = dtype
  config.eval.batch_size = config.train.batch_size
  if tiny:
    config.model.depth, config.model.width = 10, 1
    config.train.batch_size = config.margins.batch_size = config.eval.batch_size = 8
    config.attack.num_steps = 2
    config.margins.max_iter = 3
    config.eval.autoattack_chunk_size = 0
    budgets = config.eval.autoattack_budgets
    budgets.apgd_steps = budgets.fab_steps = budgets.square_queries = 2
    budgets.num_targets = 3
  if batch_size is not None:
    config.train.batch_size = config.margins.batch_size = config.eval.batch_size = batch_size
  if model_size is not None:
    config.model.depth, config.model.width = model_size
  if max_iter is not None:
    config.margins.max_iter = max_iter
  return config


@dataclasses.dataclass
class Program:
  """A jitted program, its arguments (concrete or `jax.ShapeDtypeStruct`s), examples per call."""

  fn: Any
  args: tuple[Any, ...]
  examples: int
  flops: float | None = None  # model FLOPs per call (train steps only)
  donates_state: bool = False  # a train step: its first output is the next call's state


def _abstract(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def synthetic_batch(batch_size: int, num_classes: int, eps: float) -> dict[str, np.ndarray]:
  """Random images in [0, 1], random labels, every example with radius `eps`."""
  rs = np.random.default_rng(0)
  return {
    'image': rs.uniform(0.0, 1.0, (batch_size, *IMAGE_SHAPE)).astype(np.float32),
    'label': rs.integers(0, num_classes, batch_size).astype(np.int32),
    'index': np.arange(batch_size, dtype=np.int32),
    'source': np.zeros(batch_size, np.int32),
    'eps': np.full(batch_size, eps, np.float32),
  }


def autoattack_fn(config, model, mesh) -> Callable[..., Any]:
  """jit((variables, rng, x, y) -> AutoAttackResult), as `evaluate.evaluate` builds it."""
  budgets = dict(config.eval.autoattack_budgets)
  chunk = config.eval.autoattack_chunk_size or None

  def run(variables, rng, x, y):
    return autoattack.run_standard(
      lambda v: model.apply(variables, v, train=False),
      rng,
      x,
      y,
      norm=config.attack.norm,
      eps=config.attack.eps,
      chunk_size=chunk,
      map_fn=functools.partial(parallel.per_device, mesh=mesh, num_batched_args=4),
      **budgets,
    )

  return jax.jit(run)


def build_programs(
  config, mesh, names: Sequence[str] = PROGRAMS, *, concrete: bool = False
) -> dict[str, Program]:
  """The benchmarked programs of `config` on `mesh`; `concrete`: real arrays, else abstract.

  Abstract arguments make `jax.export.export(program.fn, platforms=[...])(*program.args)`
  lower the programs for any platform without devices (tests/test_lowering.py).
  """
  unknown = set(names) - set(PROGRAMS)
  if unknown:
    raise ValueError(f'unknown programs {sorted(unknown)}; known: {PROGRAMS}')
  model = train.create_model(config.model)
  tx, schedule = train.optimizer_from_config(config)
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  init = jax.jit(
    lambda rng: steps.create_train_state(rng, model, tx, IMAGE_SHAPE), out_shardings=repl
  )
  state = (
    init(jax.random.key(0))
    if concrete
    else _abstract(jax.eval_shape(init, jax.random.key(0)), repl)
  )
  variables = state.variables()
  key = jax.random.key(1)
  out: dict[str, Program] = {}
  for name in names:
    if name.endswith('_step'):
      cfg = config.copy_and_resolve_references()
      cfg.train.loss = name.removesuffix('_step')
      b = cfg.train.batch_size
      batch = synthetic_batch(b, cfg.model.num_classes, cfg.attack.eps)
      batch = parallel.shard_batch(batch, mesh) if concrete else _abstract(batch, data)
      flops = None
      if concrete:
        forward = utilization.forward_flops(model, variables, IMAGE_SHAPE, b)
        flops = forward * utilization.train_step_passes(cfg.train.loss, cfg.attack.num_steps)
      fn = train.make_jit_train_step(cfg, model, tx, schedule, mesh)
      # The step donates its state: each train program gets its own.
      own = init(jax.random.key(0)) if concrete else state
      out[name] = Program(fn, (own, batch, key), b, flops, donates_state=True)
    elif name == 'margins':
      b = config.margins.batch_size
      settings = margins.settings_from_config(config.margins)
      fn = margins.engine.margin_program(model, settings, mesh, config.margins.deepfool_batch_size)
      batch = synthetic_batch(b, config.model.num_classes, 0.0)
      x, y = batch['image'], batch['label']
      x, y = (jax.device_put((x, y), data)) if concrete else _abstract((x, y), data)
      out[name] = Program(fn, (x, y, variables), b)
    else:
      b = config.eval.batch_size
      fn = autoattack_fn(config, model, mesh)
      x = synthetic_batch(b, config.model.num_classes, 0.0)['image']
      if concrete:
        x = jax.device_put(x, data)
        # The model's own predictions as labels: every example is attacked.
        y = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))(variables, x)
        y = jax.device_put(y.astype(jnp.int32), data)
      else:
        x, y = _abstract(x, data), jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data)
      out[name] = Program(fn, (variables, key, x, y), b)
  return out


def time_program(program: Program, *, repeats: int, num_devices: int, peak) -> dict[str, Any]:
  """Compile time, median run time, examples/s (per device) and MFU of one program."""
  t0 = time.perf_counter()
  compiled = program.fn.lower(*program.args).compile()
  compile_s = time.perf_counter() - t0
  args = program.args
  times = []
  for i in range(repeats + 1):  # the first run is untimed
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    if i:
      times.append(time.perf_counter() - t0)
    if program.donates_state:  # the step donated its state: carry the new one
      args = (out[0], *args[1:])
  run_s = statistics.median(times)
  result = {
    'compile_s': compile_s,
    'run_s': times,
    'run_s_median': run_s,
    'examples': program.examples,
    'examples_per_s': program.examples / run_s,
    'examples_per_s_per_device': program.examples / run_s / num_devices,
  }
  if program.flops is not None:
    result['model_flops'] = program.flops
    result['mfu'] = utilization.mfu(program.flops, run_s, num_devices, peak)
  memory = compiled.memory_analysis()
  if memory is not None and hasattr(memory, 'temp_size_in_bytes'):
    result['temp_bytes'] = int(memory.temp_size_in_bytes)
  return result


def margin_dtype_difference(config, mesh) -> dict[str, float]:
  """DeepFool margins of one batch in float32 and bfloat16 compute, the same weights."""
  out = {}
  for dtype in ('float32', 'bfloat16'):
    cfg = config.copy_and_resolve_references()
    cfg.model.dtype = dtype
    prog = build_programs(cfg, mesh, ('margins',), concrete=True)['margins']
    margin, iterations, converged = jax.device_get(prog.fn(*prog.args))
    out[dtype] = (np.asarray(margin, np.float64), np.asarray(converged))
  (m32, c32), (m16, c16) = out['float32'], out['bfloat16']
  both = c32 & c16
  rel = np.abs(m16 - m32)[both] / np.maximum(np.abs(m32[both]), 1e-12)
  order32, order16 = np.argsort(np.argsort(m32)), np.argsort(np.argsort(m16))
  rank = float(np.corrcoef(order32, order16)[0, 1]) if len(m32) > 1 else 1.0
  return {
    'examples': len(m32),
    'converged_both': int(both.sum()),
    'mean_abs_margin_f32': float(np.mean(np.abs(m32))),
    'relative_difference_median': float(np.median(rel)) if rel.size else float('nan'),
    'relative_difference_p90': float(np.quantile(rel, 0.9)) if rel.size else float('nan'),
    'relative_difference_max': float(rel.max()) if rel.size else float('nan'),
    'rank_correlation': rank,
  }


def report(r: dict[str, Any]) -> str:
  lines = [f'jax {r["jax"]} on {r["num_devices"]} x {r["device_kind"]}; {r["model"]}']
  peak = r['peak_flops']
  lines.append(
    f'bf16 dense peak: {peak / 1e12:.0f} TFLOP/s per device'
    if peak
    else 'bf16 dense peak: unknown for this device kind (MFU not reported)'
  )
  for key, t in r['timings'].items():
    line = (
      f'{key}: batch {t["examples"]}, compile {t["compile_s"]:.1f} s, median '
      f'{1e3 * t["run_s_median"]:.1f} ms, {t["examples_per_s"]:.1f} examples/s '
      f'({t["examples_per_s_per_device"]:.1f} per device)'
    )
    if t.get('mfu') is not None:
      line += f', MFU {100 * t["mfu"]:.1f}%'
    lines.append(line)
  if 'margin_dtypes' in r:
    d = r['margin_dtypes']
    lines.append(
      f'DeepFool margins bf16 vs f32 ({d["converged_both"]}/{d["examples"]} converged in both): '
      f'relative difference median {d["relative_difference_median"]:.3g}, 90th percentile '
      f'{d["relative_difference_p90"]:.3g}, max {d["relative_difference_max"]:.3g}; rank '
      f'correlation {d["rank_correlation"]:.4f}'
    )
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument('--tiny', action='store_true', help='WRN-10-1, batch 8, tiny budgets')
  ap.add_argument('--programs', default=','.join(PROGRAMS), help=f'comma-separated {PROGRAMS}')
  ap.add_argument('--dtypes', default=','.join(DTYPES), help='compute dtypes of the train steps')
  ap.add_argument('--batch-size', type=int, help='batch of every program (default 512/1024)')
  ap.add_argument('--devices', type=int, default=0, help='devices of the mesh (0: all)')
  ap.add_argument('--repeats', type=int, help='timed runs per program (default 5; 2 --tiny)')
  ap.add_argument('--margin-dtypes', action='store_true', help='bf16 vs f32 DeepFool margins')
  ap.add_argument('--model-size', help='DEPTH,WIDTH of the WRN (default 28,10; 10,1 --tiny)')
  ap.add_argument('--max-iter', type=int, help="DeepFool's iterations (default 50; 3 --tiny)")
  ap.add_argument('--out', help='also write the results as JSON to this file')
  args = ap.parse_args(argv)
  names = [n for n in args.programs.split(',') if n]
  dtypes = [d for d in args.dtypes.split(',') if d]
  if set(dtypes) - set(DTYPES):
    ap.error(f'--dtypes {args.dtypes}: choose from {DTYPES}')
  devices = jax.devices()
  if not 0 <= args.devices <= len(devices):
    ap.error(f'--devices {args.devices}: there are {len(devices)} devices')
  devices = devices[: args.devices or None]
  mesh = parallel.make_mesh(devices)
  repeats = args.repeats or (2 if args.tiny else 5)
  kind = devices[0].device_kind
  peak = utilization.peak_flops(kind)
  size = tuple(int(v) for v in args.model_size.split(',')) if args.model_size else None
  sizes = dict(batch_size=args.batch_size, model_size=size, max_iter=args.max_iter)
  base = load_config(tiny=args.tiny, **sizes)
  m = base.model
  result: dict[str, Any] = {
    'jax': jax.__version__,
    'device_kind': kind,
    'num_devices': len(devices),
    'peak_flops': peak,
    'model': f'WRN-{m.depth}-{m.width} ({m.activation})',
    'timings': {},
  }
  for dtype in dtypes:
    config = load_config(tiny=args.tiny, dtype=dtype, **sizes)
    # The attacks run once, in the config's dtype (bfloat16); the train steps in each dtype.
    todo = [n for n in names if n.endswith('_step') or dtype == dtypes[0]]
    for name, program in build_programs(config, mesh, todo, concrete=True).items():
      key = f'{name} {dtype}'
      result['timings'][key] = time_program(
        program, repeats=repeats, num_devices=len(devices), peak=peak
      )
      print(report({**result, 'timings': {key: result['timings'][key]}}).splitlines()[-1])
  if args.margin_dtypes:
    result['margin_dtypes'] = margin_dtype_difference(base, mesh)
  print(report(result), flush=True)
  if args.out:
    tmp = f'{args.out}.tmp'
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
  return result


if __name__ == '__main__':
  main()
