"""Margin stage throughput: the whole stage against raw DeepFool, and the cost of more classes.

Two measurements on the embedded MNIST data (real train split plus generated
digits, built with `datasets.prepare` and the default config's data section)
and the default SmallCNN, trained by the pipeline's own margin_model stage
(the default's TRADES margin model, `--train_steps` steps) so that DeepFool
does a realistic number of steps:

1. Stage overhead. `margins.compute_margins` end to end over the built TFDS
   shards (reading and decoding with grain, host-to-device copies, per-device
   DeepFool, pulling results back, writing the sidecars and manifests, the final
   load and summary; a fresh sidecar folder every repeat) against the raw
   DeepFool throughput of the same compiled program on the same batches held on
   the devices (`MarginEngine`, dispatched back to back). Compilation happens
   once before both and is excluded. Repeats alternate between the two.
2. Classes. The per-example cost of DeepFool with a fixed `num_candidates` for
   SmallCNNs whose last layer has 10, 100 and 1,000 outputs (same trunk, random
   weights, `--class_max_iter` steps at most), on the same images. Iteration
   counts differ between models, so the cost is also given per example and per
   while-loop trip (a trip is one forward pass and one VJP vmapped over the
   candidates, for every row of a device's slice).

On a CPU this is slow (DeepFool on the SmallCNN runs at tens of examples/s per
core), hence the small defaults: the stage scores the 2,048 generated digits.

Usage (use --quick, about two minutes, to check that it runs):

  PYTHONPATH=. python experiments/bench_margins.py [--cpu_devices 4] [--out bench.json]
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--data_dir', default='', help='TFDS data_dir (default: a temporary folder)')
  ap.add_argument('--generated_examples', type=int, default=2048)
  ap.add_argument(
    '--sources', default='generated', help='splits the stage scores: generated, real or both'
  )
  ap.add_argument('--batch_size', type=int, default=128)
  ap.add_argument(
    '--deepfool_batch_size',
    type=int,
    default=0,
    help="DeepFool's batch_size per device (0: whole batch)",
  )
  ap.add_argument('--norm', default='linf', choices=['linf', 'l2'])
  ap.add_argument('--num_candidates', type=int, default=10)
  ap.add_argument('--max_iter', type=int, default=50)
  ap.add_argument(
    '--train_steps', type=int, default=300, help="steps of the pipeline's margin model"
  )
  ap.add_argument('--repeats', type=int, default=2)
  ap.add_argument('--class_counts', default='10,100,1000')
  ap.add_argument('--class_batches', type=int, default=4, help='batches per class-count row')
  ap.add_argument(
    '--class_max_iter', type=int, default=10, help='DeepFool steps at most in the class rows'
  )
  ap.add_argument('--cpu_devices', type=int, default=0, help='emulate N CPU devices (CPU only)')
  ap.add_argument('--quick', action='store_true', help='small sizes, one repeat')
  ap.add_argument('--out', default='', help='write the results as JSON here')
  args = ap.parse_args()
  if args.quick:
    args.generated_examples, args.batch_size, args.repeats = 256, 32, 1
    args.train_steps, args.class_batches = 100, 1
  return args


ARGS = parse_args()
if ARGS.cpu_devices:
  import jax

  jax.config.update('jax_num_cpu_devices', ARGS.cpu_devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import default as default_config_module  # noqa: E402
from puma_jax import datasets, margins, model_io, models, parallel, pipeline  # noqa: E402
from puma_jax.datasets import input_pipeline  # noqa: E402


def log(*a) -> None:
  print(f'[{time.strftime("%H:%M:%S")}]', *a, flush=True)


def cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def default_config(data_dir: str):
  """The default pipeline with ARGS' generated set and a margin model of ARGS.train_steps."""
  c = default_config_module.get_config()
  c.data.data_dir = data_dir
  c.data.generated.num_examples = ARGS.generated_examples
  c.data.generated.name = f'mnist_generated_{ARGS.generated_examples}'
  c.margin_model.num_steps = ARGS.train_steps
  return c


def margin_model(config, workdir: Path):
  """The data and the pipeline's own margin model (its prepare and margin_model stages)."""
  for stage in ('prepare', 'margin_model'):
    pipeline.run(config, workdir, stage=stage)
  prepared = datasets.prepare(config.data, config.data.data_dir, build=False)
  model, variables = model_io.restore_ema_variables(config.model, workdir / 'margin_model')
  log(f'margin model: {config.margin_model.num_steps} steps of {config.train.loss}')
  return prepared, model, variables


def shard_batches_in_memory(splits, batch_size):
  """Every batch the stage reads (per shard, last one padded), as numpy arrays."""
  out = []
  for split in splits.values():
    for k in range(split.num_shards):
      for b in input_pipeline.shard_batches(split, k, batch_size=batch_size):
        out.append((b['image'], b['label'], int(b['mask'].sum())))
  return out


def time_raw(engine, device_batches) -> tuple[float, float]:
  """Seconds and CPU seconds for DeepFool on batches already on the devices."""
  c0, t0 = cpu_seconds(), time.perf_counter()
  outs = [engine(x, y) for x, y in device_batches]
  jax.block_until_ready(outs)
  return time.perf_counter() - t0, cpu_seconds() - c0


def time_stage(model, variables, splits, settings, root) -> tuple[float, float, dict]:
  c0, t0 = cpu_seconds(), time.perf_counter()
  res = margins.compute_margins(
    model,
    variables,
    splits,
    settings=settings,
    batch_size=ARGS.batch_size,
    deepfool_batch_size=ARGS.deepfool_batch_size,
    sidecar_root=root,
    summary_dir=Path(root) / 'summary',
    progress_every_s=1e9,
  )
  return time.perf_counter() - t0, cpu_seconds() - c0, res.run


def bench_stage(model, variables, splits, settings, tmp) -> dict:
  mesh = parallel.make_mesh(jax.local_devices())
  engine = margins.MarginEngine(
    model, variables, settings, mesh, ARGS.batch_size, ARGS.deepfool_batch_size
  )
  batches = shard_batches_in_memory(splits, ARGS.batch_size)
  n = sum(m for _, _, m in batches)
  device_batches = [
    (jax.device_put(x, engine.sharding), jax.device_put(y, engine.sharding)) for x, y, _ in batches
  ]
  t0 = time.perf_counter()
  first = engine.dispatch(*batches[0][:2])
  jax.block_until_ready(first)
  log(f'compiled and ran one batch in {time.perf_counter() - t0:.1f} s')
  raw, stage, runs = [], [], []
  for r in range(ARGS.repeats):
    seconds, cpu = time_raw(engine, device_batches)
    raw.append((seconds, cpu))
    log(
      f'raw   {r}: {n / seconds:8.1f} examples/s ({seconds:.2f} s, CPU {cpu:.2f} s = '
      f'{cpu / seconds:.2f} cores)'
    )
    seconds, cpu, run = time_stage(model, variables, splits, settings, Path(tmp) / f'side{r}')
    stage.append((seconds, cpu))
    runs.append(run)
    log(
      f'stage {r}: {n / seconds:8.1f} examples/s ({seconds:.2f} s, CPU {cpu:.2f} s = '
      f'{cpu / seconds:.2f} cores; compute phase {run["compute_seconds"]:.2f} s, '
      f'compilations {run["compilations"]})'
    )
  raw_s, raw_cpu = (statistics.median(x) for x in zip(*raw, strict=True))
  stage_s, stage_cpu = (statistics.median(x) for x in zip(*stage, strict=True))
  outs = [engine.dispatch(x, y) for x, y, _ in batches]
  iterations = np.concatenate(
    [np.asarray(o[1])[:m] for o, (_, _, m) in zip(outs, batches, strict=True)]
  )
  return {
    'examples': n,
    'batches': len(batches),
    'batch_size': ARGS.batch_size,
    'deepfool_batch_size': ARGS.deepfool_batch_size,
    'devices': parallel.num_devices(mesh),
    'device_kind': mesh.devices.flat[0].device_kind,
    'mean_iterations': float(iterations.mean()),
    'raw_examples_per_s': n / raw_s,
    'stage_examples_per_s': n / stage_s,
    'stage_compute_phase_examples_per_s': n / statistics.median(r['compute_seconds'] for r in runs),
    'overhead_fraction': 1.0 - raw_s / stage_s,
    # CPU seconds: on a shared CPU, less sensitive to what other jobs take.
    'raw_examples_per_cpu_s': n / raw_cpu,
    'stage_examples_per_cpu_s': n / stage_cpu,
    'cpu_overhead_fraction': 1.0 - raw_cpu / stage_cpu,
    'raw_seconds': [s for s, _ in raw],
    'stage_seconds': [s for s, _ in stage],
    'raw_cpu_seconds': [c for _, c in raw],
    'stage_cpu_seconds': [c for _, c in stage],
  }


def bench_classes(splits, settings) -> list[dict]:
  mesh = parallel.make_mesh(jax.local_devices())
  n_dev = parallel.num_devices(mesh)
  batches = shard_batches_in_memory({'real': splits['real']}, ARGS.batch_size)
  batches = batches[: ARGS.class_batches]
  examples = len(batches) * ARGS.batch_size
  counts = [int(x) for x in ARGS.class_counts.split(',')]
  engines, device_batches, trips, mean_its = {}, {}, {}, {}
  for k in counts:
    model = models.create('small_cnn', num_classes=k)
    variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
    engine = margins.MarginEngine(
      model, variables, settings, mesh, ARGS.batch_size, ARGS.deepfool_batch_size
    )
    outs = [engine.dispatch(x, y) for x, y, _ in batches]  # compiles, and gives the iterations
    its = [np.asarray(o[1]).reshape(n_dev, -1) for o in outs]
    # While-loop trips per batch: the slowest device's slice decides (max iterations + 1).
    trips[k] = sum(int(i.max()) + 1 for i in its)
    mean_its[k] = float(np.mean(np.concatenate(its)))
    engines[k] = engine
    device_batches[k] = [
      (jax.device_put(x, engine.sharding), jax.device_put(y, engine.sharding))
      for x, y, _ in batches
    ]
  times = {k: [] for k in counts}
  for _ in range(max(1, ARGS.repeats)):  # interleaved, so load changes hit every row alike
    for k in counts:
      times[k].append(time_raw(engines[k], device_batches[k]))
  rows = []
  for k in counts:
    seconds, cpu = (statistics.median(x) for x in zip(*times[k], strict=True))
    work = trips[k] * ARGS.batch_size
    rows.append(
      {
        'num_classes': k,
        'num_candidates': settings.num_candidates,
        'examples': examples,
        'seconds': seconds,
        'cpu_seconds': cpu,
        'us_per_example': 1e6 * seconds / examples,
        'mean_iterations': mean_its[k],
        'loop_trips': trips[k],
        'us_per_example_trip': 1e6 * seconds / work,
        'cpu_us_per_example_trip': 1e6 * cpu / work,
      }
    )
    r = rows[-1]
    log(
      f'K={k:5d}: {r["us_per_example"]:8.1f} us/example, {r["mean_iterations"]:.2f} steps/example, '
      f'{r["us_per_example_trip"]:7.1f} us ({r["cpu_us_per_example_trip"]:7.1f} CPU us) per '
      'example and loop trip'
    )
  return rows


def main() -> None:
  with tempfile.TemporaryDirectory(prefix='bench_margins_') as tmp:
    run(tmp)


def run(tmp: str) -> None:
  log(f'devices: {jax.local_devices()}')
  data_dir = ARGS.data_dir or os.path.join(tmp, 'data')
  t0 = time.perf_counter()
  config = default_config(data_dir)
  prepared, model, variables = margin_model(config, Path(tmp) / 'pipeline')
  log(f'data and margin model ready in {time.perf_counter() - t0:.1f} s\n{prepared.summary()}')
  sources = ('real', 'generated') if ARGS.sources == 'both' else (ARGS.sources,)
  train_splits = prepared.train_splits
  splits = {k: train_splits[k] for k in sources}
  settings = margins.DeepFoolSettings(
    norm=ARGS.norm, num_candidates=ARGS.num_candidates, max_iter=ARGS.max_iter
  )
  stage = bench_stage(model, variables, splits, settings, tmp)
  classes = bench_classes(train_splits, dataclasses.replace(settings, max_iter=ARGS.class_max_iter))
  report = {
    'args': vars(ARGS),
    'settings': settings.as_dict(),
    'stage': stage,
    'classes': classes,
  }

  print()
  print(
    f'Stage vs raw DeepFool ({stage["examples"]:,} examples, batch {stage["batch_size"]}, '
    f'{stage["devices"]} x {stage["device_kind"]}, {stage["mean_iterations"]:.2f} steps/example, '
    f'median of {ARGS.repeats}):'
  )
  print(f'  raw DeepFool, batches on device : {stage["raw_examples_per_s"]:10.1f} examples/s')
  print(f'  margin stage, end to end        : {stage["stage_examples_per_s"]:10.1f} examples/s')
  print(f'  overhead of the stage           : {100 * stage["overhead_fraction"]:9.1f} %')
  print(
    f'  in CPU time (raw / stage)       : {stage["raw_examples_per_cpu_s"]:10.1f} / '
    f'{stage["stage_examples_per_cpu_s"]:.1f} examples per CPU-second, overhead '
    f'{100 * stage["cpu_overhead_fraction"]:.1f} %'
  )
  print()
  print(f'Classes at num_candidates={settings.num_candidates}, max_iter={ARGS.class_max_iter}:')
  print('| classes | us/example | steps/example | us per example-trip | CPU us per example-trip |')
  print('|--------:|-----------:|--------------:|--------------------:|------------------------:|')
  for r in classes:
    print(
      f'| {r["num_classes"]:7d} | {r["us_per_example"]:10.1f} | {r["mean_iterations"]:13.2f} '
      f'| {r["us_per_example_trip"]:19.1f} | {r["cpu_us_per_example_trip"]:23.1f} |'
    )
  if ARGS.out:
    Path(ARGS.out).write_text(json.dumps(report, indent=2) + '\n')
    log(f'wrote {ARGS.out}')


if __name__ == '__main__':
  main()
