r"""What refreshed margins cost: one refresh pass over the kept set against one train step.

On a finished pipeline workdir (its config, its prune stage's kept examples and
the EMA weights of its train stage, i.e. a trained model), the script builds
the train loop's refresher (`margins.refresh.from_config`, the workdir's
`c.margins` estimator and settings, on all local devices), times one refresh
pass over the kept examples (after an untimed warm-up batch that compiles the
engine program), and times `--train_steps` train steps of the workdir's config
(after an untimed compiling step). It prints both, their ratio and the
overhead of refreshing every N steps for a few N.

`--num_examples` > 0 times an evenly spaced subset of the kept examples of
every source (same share of each) and projects the whole kept set linearly;
the projection is labelled as such.

  python -m experiments.bench_refresh --workdir=/work/runs/base [--num_examples=4000]
      [--estimator=first_order]
"""

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from puma_jax import artifacts, datasets, model_io, parallel, pruning, train
from puma_jax.datasets import input_pipeline
from puma_jax.margins import refresh


def log(msg: str) -> None:
  print(msg, flush=True)  # noqa: T201 (a benchmark script's output)


def _subset(kept: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
  total = sum(len(v) for v in kept.values())
  if not n or n >= total:
    return kept
  share = n / total
  return {
    k: v[np.linspace(0, len(v) - 1, max(1, round(share * len(v)))).astype(np.int64)]
    for k, v in kept.items()
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', type=Path, required=True)
  p.add_argument('--num_examples', type=int, default=0, help='0: the whole kept set')
  p.add_argument('--train_steps', type=int, default=5)
  p.add_argument('--estimator', default='', help="c.margins.estimator ('': the workdir's)")
  p.add_argument('--out', type=Path, default=None)
  args = p.parse_args(argv)

  config, _ = artifacts.load_config(args.workdir)
  config.train.refresh_margins_every = 1
  if args.estimator:
    config.margins.estimator = args.estimator
  prepared = datasets.prepare(config.data, Path(config.data.data_dir or args.workdir / 'data'))
  result = pruning.PruneResult.load(args.workdir / 'prune')
  kept_all = {k: np.asarray(v, np.int64) for k, v in result.kept.items()}
  kept = _subset(kept_all, args.num_examples)
  model, variables = model_io.restore_ema_variables(config.model, args.workdir / 'train')
  mesh = parallel.make_mesh()
  refresher = refresh.from_config(config, model, prepared.train_splits, kept, mesh)

  # Warm-up: one batch compiles the engine program.
  first = next(iter(kept))
  warm = refresh.from_config(
    config, model, prepared.train_splits, {first: kept[first][: config.margins.batch_size]}, mesh
  )
  warm.margins(variables)
  start = time.perf_counter()
  refresher(variables, {k: result.eps[k][np.isin(kept_all[k], v)] for k, v in kept.items()})
  refresh_s = time.perf_counter() - start
  n = sum(len(v) for v in kept.values())
  n_all = sum(len(v) for v in kept_all.values())
  full_s = refresh_s * n_all / n

  # Train steps of the workdir's config (state freshly initialised: the cost is the same).
  tx, schedule = train.optimizer_from_config(config)
  image_shape = prepared.real_train.image_shape
  state = train._init_state(model, tx, image_shape, mesh, jax.random.key(0))  # noqa: SLF001
  step_fn = train.make_jit_train_step(config, model, tx, schedule, mesh)
  it = input_pipeline.train_iterator_from_config(
    config.data,
    prepared.train_splits,
    batch_size=config.train.batch_size,
    eps=config.attack.eps,
    seed=0,
    kept=result.kept,
    kept_eps=result.eps,
  )
  batches = [
    parallel.shard_batch(input_pipeline.device_fields(next(it), input_pipeline.TRAIN_FIELDS), mesh)
    for _ in range(args.train_steps + 1)
  ]
  it.close()
  state, m = step_fn(state, batches[0], jax.random.key(1))
  jax.block_until_ready(m)
  start = time.perf_counter()
  for b in batches[1:]:
    state, m = step_fn(state, b, jax.random.key(1))
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - start) / args.train_steps

  out = {
    'workdir': str(args.workdir),
    'estimator': config.margins.get('estimator', 'deepfool'),
    'devices': f'{mesh.size} x {mesh.devices.flat[0].device_kind}',
    'kept_examples': n_all,
    'timed_examples': n,
    'refresh_seconds_timed': refresh_s,
    'refresh_examples_per_second': n / refresh_s,
    'refresh_seconds_full_kept_set': full_s,
    'projected': n < n_all,
    'train_step_seconds': step_s,
    'train_batch_size': config.train.batch_size,
    'refresh_over_train_step': full_s / step_s,
  }
  log(
    f'refresh ({out["estimator"]}, {out["devices"]}): {n} kept examples in {refresh_s:.1f} s '
    f'({n / refresh_s:.1f} examples/s)'
  )
  log(
    f'whole kept set: {n_all} examples, {full_s:.1f} s'
    + (' (projected linearly from the timed subset)' if n < n_all else '')
  )
  log(f'train step (batch {config.train.batch_size}): {step_s:.3f} s')
  log(f'one refresh = {full_s / step_s:.0f} train steps')
  for every in (50, 100, 200, 400):
    log(f'  refresh every {every} steps: +{100 * full_s / (every * step_s):.0f}% training time')
  if args.out:
    artifacts.write_json(args.out, out)
  log(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
