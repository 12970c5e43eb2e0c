"""Times the WRN-28-10 (Swish) TRADES train step in bfloat16 on a GPU.

The step is the one training runs: `configs/cifar10_wrn28_10.py` (the DM-Improves-AT
recipe: TRADES beta 5 with label smoothing 0.1, Linf eps 8/255 with 10 attack steps
of 2/255, SGD with Nesterov momentum, EMA) with `model.dtype='bfloat16'`, compiled by
`puma_jax.train.make_jit_train_step` (state replicated and donated, the batch split
over the ('data',) mesh). Inputs are random images in [0, 1] with random labels, every
example with eps 8/255; the weights are a fresh initialisation (the step's cost does
not depend on them).

  python -m experiments.gpu_train_step                 # WRN-28-10, batch 512, 1 GPU
  python -m experiments.gpu_train_step --devices 0     # all GPUs (batch split over them)
  python -m experiments.gpu_train_step --tiny          # WRN-10-1, batch 8, 2 attack steps, CPU

It prints the compile time, the step time (median and best of `--steps` timed steps,
each waited for), examples/s, the compiled program's memory estimate and, on a GPU,
the device's peak memory in use. `--out FILE` also writes them as JSON. Without a GPU
(and without `--tiny`) it prints why and exits with status 3, measuring nothing.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from puma_jax import parallel, steps, train

NO_GPU_EXIT_CODE = 3
_CONFIG = Path(__file__).resolve().parent.parent / 'configs' / 'cifar10_wrn28_10.py'


def load_config(*, tiny: bool, batch_size: int | None, attack_steps: int | None):
  """The DM-Improves-AT config in bfloat16; `tiny`: a WRN-10-1 at batch 8 with 2 attack steps."""
  spec = importlib.util.spec_from_file_location('cifar10_wrn28_10', _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('baseline')
  config.model.dtype = 'bfloat16'
  if tiny:
    config.model.depth, config.model.width = 10, 1
    config.train.batch_size, config.attack.num_steps = 8, 2
  if batch_size is not None:
    config.train.batch_size = batch_size
  if attack_steps is not None:
    config.attack.num_steps = attack_steps
  return config


def select_devices(platform: str, count: int) -> list[jax.Device]:
  """The first `count` devices of `platform` (0: all); exits with a message if there are none."""
  try:
    devices = jax.devices(platform)
  except RuntimeError as e:
    print(
      f'No {platform.upper()} here (jax.devices({platform!r}) says: {e}).\n'
      'This script times the WRN-28-10 TRADES step on a GPU and measured nothing. Run it '
      'on a machine with a GPU and jax[cuda] installed, or add --tiny for the CPU smoke test.',
      file=sys.stderr,
    )
    sys.exit(NO_GPU_EXIT_CODE)
  if count < 0 or count > len(devices):
    sys.exit(f'--devices {count}: there are {len(devices)} {platform} devices')
  return devices[: count or None]


def synthetic_batch(batch_size: int, num_classes: int, eps: float) -> dict[str, np.ndarray]:
  rs = np.random.default_rng(0)
  return {
    'image': rs.uniform(0.0, 1.0, (batch_size, 32, 32, 3)).astype(np.float32),
    'label': rs.integers(0, num_classes, batch_size).astype(np.int32),
    'index': np.arange(batch_size, dtype=np.int32),
    'source': np.zeros(batch_size, np.int32),
    'eps': np.full(batch_size, eps, np.float32),
  }


def time_train_step(config, devices: Sequence[jax.Device], *, steps_timed: int) -> dict[str, Any]:
  """Compiles the train step on a mesh of `devices` and times `steps_timed` steps."""
  mesh = parallel.make_mesh(devices)
  b = config.train.batch_size
  if b % len(devices):
    sys.exit(f'--batch-size {b} must divide over the {len(devices)} devices of the mesh')
  model = train.create_model(config.model)
  tx, schedule = train.optimizer_from_config(config)
  init = jax.jit(
    lambda rng: steps.create_train_state(rng, model, tx, (32, 32, 3)),
    out_shardings=parallel.replicated(mesh),
  )
  state = init(jax.random.key(0))
  num_params = sum(p.size for p in jax.tree.leaves(state.params))
  batch = parallel.shard_batch(
    synthetic_batch(b, config.model.num_classes, config.attack.eps), mesh
  )
  rng = jax.random.key(1)
  jit_step = train.make_jit_train_step(config, model, tx, schedule, mesh)

  t0 = time.perf_counter()
  compiled = jit_step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  # Two untimed steps: the first runs on freshly allocated buffers.
  for _ in range(2):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps_timed):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not np.isfinite(metrics['loss']):
    raise FloatingPointError(f'the timed steps gave a non-finite loss: {metrics}')

  stats = [d.memory_stats() or {} for d in devices]
  result = {
    'jax': jax.__version__,
    'devices': [str(d) for d in devices],
    'device_kind': devices[0].device_kind,
    'model': f'WRN-{config.model.depth}-{config.model.width} ({config.model.activation}), '
    f'{config.model.dtype} compute, {num_params / 1e6:.1f}M float32 parameters',
    'loss': config.train.loss,
    'batch_size': b,
    'attack_steps': config.attack.num_steps,
    'compile_s': compile_s,
    'step_s': times,
    'step_s_median': statistics.median(times),
    'step_s_best': min(times),
    'examples_per_s': b / statistics.median(times),
    'examples_per_s_per_device': b / statistics.median(times) / len(devices),
    'last_metrics': metrics,
  }
  if memory is not None:
    result['compiled_memory_bytes'] = {
      k: int(getattr(memory, f'{k}_size_in_bytes'))
      for k in ('argument', 'output', 'temp', 'generated_code')
      if hasattr(memory, f'{k}_size_in_bytes')
    }
  peaks = [s['peak_bytes_in_use'] for s in stats if 'peak_bytes_in_use' in s]
  if peaks:
    result['peak_bytes_in_use_per_device'] = peaks
  return result


def report(r: dict[str, Any]) -> str:
  gib = 2**30
  lines = [
    f'jax {r["jax"]} on {len(r["devices"])} x {r["device_kind"]}',
    f'{r["model"]}; {r["loss"]} step, batch {r["batch_size"]}, {r["attack_steps"]} attack steps',
    f'compile: {r["compile_s"]:.1f} s',
    f'step time: median {1e3 * r["step_s_median"]:.1f} ms, best {1e3 * r["step_s_best"]:.1f} ms '
    f'over {len(r["step_s"])} steps',
    f'throughput: {r["examples_per_s"]:.1f} examples/s '
    f'({r["examples_per_s_per_device"]:.1f} per device)',
  ]
  if 'compiled_memory_bytes' in r:
    m = r['compiled_memory_bytes']
    lines.append(
      'compiled memory estimate per device: '
      + ', '.join(f'{k} {v / gib:.2f} GiB' for k, v in m.items())
    )
  if 'peak_bytes_in_use_per_device' in r:
    peaks = r['peak_bytes_in_use_per_device']
    lines.append(f'peak memory in use: {max(peaks) / gib:.2f} GiB (largest over the devices)')
  else:
    lines.append('peak memory in use: not reported by this platform')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    '--tiny', action='store_true', help='WRN-10-1, batch 8, 2 attack steps, on the CPU'
  )
  ap.add_argument('--devices', type=int, default=1, help='devices of the mesh (0: all)')
  ap.add_argument('--batch-size', type=int, help='global batch (default 512; 8 with --tiny)')
  ap.add_argument('--attack-steps', type=int, help='attack steps (default 10; 2 with --tiny)')
  ap.add_argument('--steps', type=int, help='timed steps (default 10; 2 with --tiny)')
  ap.add_argument('--out', help='also write the results as JSON to this file')
  args = ap.parse_args(argv)
  devices = select_devices('cpu' if args.tiny else 'gpu', args.devices)
  config = load_config(tiny=args.tiny, batch_size=args.batch_size, attack_steps=args.attack_steps)
  steps_timed = args.steps or (2 if args.tiny else 10)
  if steps_timed < 1:
    sys.exit(f'--steps {steps_timed}: time at least one step')
  result = time_train_step(config, devices, steps_timed=steps_timed)
  print(report(result), flush=True)
  if args.out:
    tmp = f'{args.out}.tmp'
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
  return result


if __name__ == '__main__':
  main()
