r"""Margin estimators side by side: cost, agreement with DeepFool, tightness, PUMA eps.

On the default margin model (the EMA weights of a finished pipeline workdir's
`margin_model` stage, loaded as the margins stage loads them) and the first
`--num_examples` generated training digits of that workdir (the examples the
margin stage scores), every estimator of `attacks.margin_estimators` runs with
the workdir config's margin settings (`c.margins.*`, `c.margins.fab.*`), per
device inside `shard_map` as the margin stage runs DeepFool, with
`c.margins.deepfool_batch_size` rows per device. The script prints, per estimator:

- examples/s: `--num_examples` over the wall time of the batches, compilation
  excluded (one untimed warm-up batch first);
- Spearman: the rank correlation of its margins with DeepFool's
  (`scipy.stats.spearmanr`; the ranking is what pruning uses);
- |m| / FAB: the median over examples of |margin| / |FAB margin|, over the
  examples where FAB found a point (FAB's margin is the smallest successful
  perturbation it found, an upper bound on the distance);
- eps >10%: the share of examples whose PUMA eps (`pruning.compute_eps` with
  c.attack.eps and c.prune.eps_rule) differs from the eps of their DeepFool
  margin by more than 10% of the latter;
- converged: the estimator's own success share (see `MarginEstimate`).

  python -m experiments.bench_estimators --workdir=/tmp/puma_default [--out=bench.json]

`--tiny` needs no workdir: a SmallCNN trained for a few clean steps on the
embedded real digits, and a few digits from the embedded generator (tests).
"""

import argparse
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from puma_jax import artifacts, parallel, pipeline, pruning, tables, train
from puma_jax.attacks import margin_estimators
from puma_jax.datasets import generator, input_pipeline, mnist

ESTIMATOR_ORDER = ('deepfool', 'first_order', 'fab')


def log(msg: str) -> None:
  print(msg, flush=True)  # noqa: T201 (a benchmark script's output)


def workdir_inputs(workdir: Path, n: int) -> tuple[Any, Any, Any, np.ndarray, np.ndarray]:
  """(config, model, EMA variables, x f32[n,H,W,C] in [0,1], y i32[n]) of a pipeline workdir."""
  config, _ = artifacts.load_config(workdir)
  if not (workdir / 'margin_model' / 'stage.json').exists():
    raise SystemExit(f'{workdir}/margin_model/stage.json is missing: run the margin_model stage')
  ctx = pipeline.Context(config, workdir)
  model, variables = pipeline.margin_model(ctx)
  split = ctx.prepared().generated
  if split is None or split.num_examples < n:
    have = 0 if split is None else split.num_examples
    raise SystemExit(f'--num_examples {n}: the workdir has {have} generated examples')
  images, labels = input_pipeline.read_examples(split, np.arange(n))
  return config, model, variables, images.astype(np.float32) / 255.0, labels


def tiny_inputs(n: int, train_steps: int = 40) -> tuple[Any, Any, Any, np.ndarray, np.ndarray]:
  """The :tiny config, a SmallCNN after `train_steps` clean Adam steps, n generated digits."""
  from configs import default

  config = default.get_config('tiny')
  config.margins.fab.num_steps, config.margins.fab.restarts = 5, 2
  images, labels, _ = mnist.split_arrays('train')
  x_train = jnp.asarray(images, jnp.float32) / 255.0
  y_train = jnp.asarray(labels, jnp.int32)
  model = train.create_model(config.model)
  variables = model.init(jax.random.key(0), x_train[:2], train=False)
  params = variables['params']
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, i):
    idx = jax.random.randint(jax.random.key(i), (64,), 0, len(x_train))

    def loss(p):
      logits = model.apply({**variables, 'params': p}, x_train[idx], train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean()

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for i in range(train_steps):
    params, opt_state = step(params, opt_state, i)
  variables = {**variables, 'params': params}
  gen = generator.ClassConditionalGenerator().fit(images, labels)
  gx, gy = gen.sample(n, seed=0)
  return config, model, variables, gx.astype(np.float32) / 255.0, gy.astype(np.int32)


def run_estimator(
  name: str,
  config: Any,
  model: Any,
  variables: Any,
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
) -> tuple[margin_estimators.MarginEstimate, float, float]:
  """(estimate over all x, seconds without compilation, compile+warm-up seconds)."""
  mesh = parallel.make_mesh(jax.local_devices())
  devices = parallel.num_devices(mesh)
  if batch_size % devices:
    raise SystemExit(f'--batch_size {batch_size}: need a multiple of the {devices} devices')
  _, settings = margin_estimators.settings_from_config(
    {**config.margins.to_dict(), 'estimator': name}
  )
  fn = functools.partial(
    margin_estimators.ESTIMATORS[name],
    norm=config.margins.norm,
    num_candidates=config.margins.num_candidates,
    clip=(0.0, 1.0) if config.margins.clip else None,
    batch_size=min(config.margins.deepfool_batch_size, batch_size // devices) or None,
    **settings,
  )

  def per_device(xb, yb, variables):
    return tuple(fn(lambda v: model.apply(variables, v, train=False), xb, yb))

  program = jax.jit(parallel.per_device(per_device, mesh, num_batched_args=2))
  n = len(x)
  pad = -n % batch_size
  xp = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
  yp = np.concatenate([y, np.repeat(y[:1], pad, axis=0)])
  sharding = parallel.data_sharding(mesh)
  batches = [
    (
      jax.device_put(xp[i : i + batch_size], sharding),
      jax.device_put(yp[i : i + batch_size], sharding),
    )
    for i in range(0, len(xp), batch_size)
  ]
  variables = jax.device_put(variables, parallel.replicated(mesh))
  t0 = time.perf_counter()
  jax.block_until_ready(program(*batches[0], variables))
  warm = time.perf_counter() - t0
  t0 = time.perf_counter()
  outs = [program(xb, yb, variables) for xb, yb in batches]
  outs = jax.block_until_ready(outs)
  seconds = time.perf_counter() - t0
  joined = [np.concatenate([np.asarray(o[k]) for o in outs])[:n] for k in range(3)]
  return margin_estimators.MarginEstimate(*joined), seconds, warm


def compare(
  results: dict[str, margin_estimators.MarginEstimate], eps: float, rule: str
) -> dict[str, dict[str, float]]:
  """The printed metrics of every estimator against DeepFool and FAB (see the docstring)."""
  ref = np.asarray(results['deepfool'].margin, np.float64)
  ref_eps = pruning.compute_eps(ref, eps, rule).astype(np.float64)
  fab = results.get('fab')
  rows = {}
  for name, res in results.items():
    m = np.asarray(res.margin, np.float64)
    row = {
      'converged': float(np.mean(res.converged)),
      'mean_iterations': float(np.mean(res.iterations)),
      'negative': float(np.mean(m < 0)),
      'median_margin': float(np.median(m)),
      'spearman_vs_deepfool': float(scipy.stats.spearmanr(m, ref).statistic),
    }
    if fab is not None:
      fm = np.asarray(fab.margin, np.float64)
      ok = np.asarray(fab.converged) & (fm != 0) & np.isfinite(m)
      row['median_ratio_to_fab'] = float(np.median(np.abs(m[ok]) / np.abs(fm[ok])))
      row['fab_points'] = int(ok.sum())
    e = pruning.compute_eps(m, eps, rule).astype(np.float64)
    row['eps_changed_10pct'] = float(np.mean(np.abs(e - ref_eps) > 0.1 * np.abs(ref_eps)))
    rows[name] = row
  return rows


def table(rows: dict[str, dict[str, float]], speed: dict[str, float]) -> str:
  columns = [
    'estimator',
    'examples/s',
    'Spearman vs DeepFool',
    'median abs(m)/FAB',
    'eps >10%',
    'converged',
  ]
  cells = [
    [
      name,
      f'{speed[name]:,.1f}',
      f'{r["spearman_vs_deepfool"]:.3f}',
      f'{r.get("median_ratio_to_fab", float("nan")):.3f}',
      f'{100 * r["eps_changed_10pct"]:.1f}%',
      f'{100 * r["converged"]:.1f}%',
    ]
    for name, r in rows.items()
  ]
  return tables.markdown_table(columns, cells)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='', help='a finished pipeline workdir (margin_model stage)')
  p.add_argument('--num_examples', type=int, default=4000)
  p.add_argument('--batch_size', type=int, default=1000, help='examples per dispatch')
  p.add_argument('--estimators', default=','.join(ESTIMATOR_ORDER))
  p.add_argument('--tiny', action='store_true', help='a tiny model and a few digits (tests)')
  p.add_argument('--out', default='', help='write the results as JSON here')
  a = p.parse_args(argv)
  names = [n for n in a.estimators.split(',') if n]
  for n in names:
    margin_estimators.check_name(n)
  if 'deepfool' not in names:
    raise SystemExit('--estimators must include deepfool (the reference)')
  if a.tiny:
    a.num_examples, a.batch_size = min(a.num_examples, 16), min(a.batch_size, 8)
    config, model, variables, x, y = tiny_inputs(a.num_examples)
    source = 'tiny'
  else:
    if not a.workdir:
      raise SystemExit('give --workdir (a finished pipeline workdir) or --tiny')
    config, model, variables, x, y = workdir_inputs(Path(a.workdir), a.num_examples)
    source = a.workdir
  log(
    f'{len(x)} generated digits, margin model of {source}; {len(jax.local_devices())} '
    f'{jax.default_backend()} device(s); norm {config.margins.norm}, '
    f'{config.margins.num_candidates} candidates, deepfool_batch_size {config.margins.deepfool_batch_size}, '
    f'fab {config.margins.fab.restarts}x{config.margins.fab.num_steps} steps'
  )
  results, speed, timing = {}, {}, {}
  for name in sorted(names, key=lambda n: ESTIMATOR_ORDER.index(n)):
    res, seconds, warm = run_estimator(name, config, model, variables, x, y, a.batch_size)
    results[name], speed[name] = res, len(x) / seconds
    timing[name] = {'seconds': seconds, 'compile_and_warmup_seconds': warm}
    log(f'{name}: {seconds:.1f} s ({speed[name]:,.1f} examples/s), warm-up {warm:.1f} s')
  rows = compare(results, config.attack.eps, config.prune.eps_rule)
  text = table(rows, speed)
  log(text)
  out = {
    'source': source,
    'num_examples': len(x),
    'backend': jax.default_backend(),
    'devices': len(jax.local_devices()),
    'settings': config.margins.to_dict(),
    'eps': config.attack.eps,
    'eps_rule': config.prune.eps_rule,
    'timing': timing,
    'examples_per_second': speed,
    'metrics': rows,
    'table': text,
  }
  if a.out:
    Path(a.out).write_text(json.dumps(out, indent=2) + '\n')
  return out


if __name__ == '__main__':
  main()
