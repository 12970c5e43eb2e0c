"""What the checkpoint checksums cost: hashing a WRN-28-10 train state on this CPU.

The checkpointer records a sha256 per leaf of every item when it saves and
verifies them when it restores (`puma_jax.checkpointing`). This times
`artifacts.tree_checksums` on host arrays of the CIFAR-10 WRN-28-10 train state
(params, SGD momentum, EMA params, BatchNorm statistics), built from the
config's shapes with random values, and prints the size, the seconds per hash
(best of --repeats) and the throughput.

  python experiments/bench_checksums.py [--repeats 3]
"""

import argparse
import functools
import importlib
import time

import jax
import numpy as np

from puma_jax import artifacts, steps, train


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--config', default='configs.cifar10_wrn28_10')
  args = parser.parse_args()
  config = importlib.import_module(args.config).get_config()
  model = train.create_model(config.model)
  tx, _ = train.optimizer_from_config(config, 1000)
  shapes = jax.eval_shape(
    functools.partial(steps.create_train_state, model=model, tx=tx, image_shape=(32, 32, 3)),
    jax.random.key(0),
  )
  rng = np.random.default_rng(0)
  state = jax.tree.map(
    lambda s: (
      rng.standard_normal(s.shape).astype(s.dtype)
      if np.issubdtype(s.dtype, np.floating)
      else np.zeros(s.shape, s.dtype)
    ),
    shapes,
  )
  params = sum(x.size for x in jax.tree.leaves(state.params))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    artifacts.tree_checksums(state)
    times.append(time.perf_counter() - start)
  best = min(times)
  print(f'model {config.model.name}: {params / 1e6:.2f}M parameters')
  print(f'train state (params, optimizer state, EMA, batch stats): {nbytes / 2**20:.0f} MiB')
  print(f'sha256 checksums: {best:.3f} s (best of {args.repeats}: {[round(t, 3) for t in times]})')
  print(f'throughput: {nbytes / best / 2**30:.2f} GiB/s; paid once per save and once per restore')


if __name__ == '__main__':
  main()
