"""`train_and_evaluate(config, workdir)`: the adversarial-training loop.

Orchestration only: the step functions are pure (`steps.py`), the mesh lives in
`parallel.py`, Orbax in `checkpointing.py`, the data in `datasets/`. A rerun
of the same call resumes from the latest checkpoint in `workdir` (train state,
data-iterator position and the pruning output trained on) and gives the same
states and metrics as an uninterrupted run. The workdir is never deleted.
"""

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from puma_jax import artifacts, checkpointing, evaluator, parallel, steps, utilization
from puma_jax.datasets import Prepared, input_pipeline
from puma_jax.margins import refresh as margin_refresh
from puma_jax.metric_writer import MetricWriter, read_metrics
from puma_jax.model_io import create_model
from puma_jax.progress import Progress


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""


def optimizer_from_config(config: Any, num_steps: int | None = None):
  """The optimiser and learning-rate schedule of `config.train`."""
  train = config.train
  return steps.make_optimizer(
    learning_rate=train.learning_rate,
    num_steps=num_train_steps(config, num_steps),
    warmup_steps=train.warmup_steps,
    momentum=train.momentum,
    nesterov=train.nesterov,
    weight_decay=train.weight_decay,
    lr_schedule=train.lr_schedule,
    steps_per_epoch=train.steps_per_epoch,
    pct_start=train.pct_start,
    weight_decay_on=train.weight_decay_on,
  )


def _rngs(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  root = jax.random.key(seed)
  return tuple(jax.random.fold_in(root, i) for i in range(3))  # init, train, eval


def _init_state(model, tx, image_shape, mesh, init_rng) -> steps.TrainState:
  init = functools.partial(steps.create_train_state, model=model, tx=tx, image_shape=image_shape)
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(init_rng)


EMA_BATCH_STATS = ('average', 'copy_each_epoch')


def make_jit_train_step(
  config, model, tx, schedule, mesh, num_steps: int | None = None
) -> Callable[..., Any]:
  """The compiled train step: state replicated (and donated), batch split over 'data'."""
  attack, train = config.attack, config.train
  if train.ema_batch_stats not in EMA_BATCH_STATS:
    raise ValueError(
      f'unknown train.ema_batch_stats {train.ema_batch_stats!r}; known: {EMA_BATCH_STATS}'
    )
  copy_bn = train.ema_batch_stats == 'copy_each_epoch'
  if copy_bn and train.steps_per_epoch <= 0:
    raise ValueError('train.ema_batch_stats=copy_each_epoch needs train.steps_per_epoch > 0')
  step = functools.partial(
    steps.train_step,
    model=model,
    tx=tx,
    schedule=schedule,
    loss=train.loss,
    norm=attack.norm,
    num_steps=attack.num_steps,
    step_size=attack.step_size
    if train.loss == 'pgd_at' or not train.trades_step_size
    else train.trades_step_size,
    trades_beta=train.trades_beta,
    label_smoothing=train.label_smoothing,
    ema_decay=train.ema_decay,
    ema_warmup_steps=train.ema_warmup_fraction * num_train_steps(config, num_steps),
    ema_batch_stats_every=train.steps_per_epoch if copy_bn else 0,
    trades_start=train.trades_start,
    attack_batchnorm=train.attack_batchnorm,
    bn_first_batch=train.bn_first_batch,
  )
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(
    parallel.with_mesh(step, mesh),  # per-device kernel gradients on CPU (layers.conv2d)
    in_shardings=(repl, data, repl),
    out_shardings=(repl, repl),
    donate_argnums=0,
  )


def evaluate_pgd(
  variables: Any, split: Any, *, config: Any, model: Any, mesh: jax.sharding.Mesh, rng: jax.Array
) -> dict[str, float]:
  """Clean and PGD-CE accuracy of `variables` on `split` (exact with a padded last batch).

  The training-time evaluation (`evaluator.training_settings`); batch i draws its PGD
  start from `fold_in(rng, i)`.
  """
  ev = evaluator.get(model, evaluator.training_settings(config), mesh)
  result = ev.accuracy(
    variables,
    split,
    batch_size=config.eval.batch_size,
    num_examples=config.eval.num_examples,
    rng=rng,
  )
  return {
    'num_examples': result['num_examples'],
    'clean_accuracy': result['clean'],
    'pgd_accuracy': result['pgd_ce'],
  }


def num_train_steps(config: Any, override: int | None = None) -> int:
  steps_ = int(override if override is not None else config.train.num_steps)
  if steps_ <= 0:
    raise ValueError(f'train.num_steps must be positive, got {steps_}')
  return steps_


def _step_meter(config, model, state, image_shape, mesh) -> utilization.StepMeter:
  """The train loop's throughput meter; MFU only on a device kind with a known peak."""
  kind = mesh.devices.flat[0].device_kind
  peak, flops = utilization.peak_flops(kind), None
  if peak is not None:
    try:
      forward = utilization.forward_flops(
        model, state.variables(), image_shape, config.train.batch_size
      )
      flops = forward * utilization.train_step_passes(config.train.loss, config.attack.num_steps)
      logging.info(
        'MFU: %.3g model FLOPs per step over %d x %s at %.0f TFLOP/s (bf16 dense peak)',
        flops,
        mesh.size,
        kind,
        peak / 1e12,
      )
    except ValueError as e:
      logging.warning('MFU not reported: %s', e)
  else:
    logging.info('MFU not reported: no peak FLOP/s known for device kind %r', kind)
  return utilization.StepMeter(config.train.batch_size, mesh.size, flops, peak)


def _mean_metrics(history: list[Mapping[str, jax.Array]]) -> dict[str, float]:
  host = jax.device_get(history)
  out = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
  out['nonfinite'] = float(sum(h['nonfinite'] for h in host))
  return out


def _last_eval(metrics_path: Path) -> dict[str, float]:
  """The last evaluation logged in a finished run's metrics."""
  last = {}
  for row in read_metrics(metrics_path):
    evals = {k.removeprefix('eval/'): v for k, v in row.items() if k.startswith('eval/')}
    if evals:
      last = evals
  if 'num_examples' in last:
    last['num_examples'] = int(last['num_examples'])
  return last


def train_and_evaluate(
  config: Any,
  workdir: str | Path,
  *,
  prepared: Prepared,
  kept: Mapping[str, np.ndarray] | None = None,
  kept_eps: Mapping[str, np.ndarray] | None = None,
  num_steps: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
  on_step: Callable[[int, steps.TrainState], None] | None = None,
) -> tuple[steps.TrainState, dict[str, float]]:
  """Adversarial training with periodic evaluation of the EMA weights; resumable.

  Args:
    config: the run's config (`data`, `model`, `attack`, `train`, `eval`, `seed`).
    workdir: the run's folder: `checkpoints/`, `metrics.jsonl`, TensorBoard events.
    prepared: the datasets (`datasets.prepare`).
    kept, kept_eps: pruning output per source ('real', 'generated'): global ids
      and the per-example eps aligned with them; None trains on everything with
      the constant `config.attack.eps`.
    num_steps: overrides `config.train.num_steps` (the margin model's short run).
    mesh: the ('data',) mesh; default all devices.
    on_step: called with (step, state) after every step (tests use it to stop a
      run); never called for the steps restored from a checkpoint.

  Returns:
    The final train state and the final evaluation metrics.
  """
  workdir = Path(workdir)
  mesh = mesh or parallel.make_mesh()
  total = num_train_steps(config, num_steps)
  train_cfg = config.train
  model = create_model(config.model)
  if prepared.real_train.num_classes != config.model.num_classes:
    raise ValueError(
      f'model.num_classes={config.model.num_classes} but the dataset has '
      f'{prepared.real_train.num_classes} classes; fix config.model.num_classes.'
    )
  parallel.local_batch_size(train_cfg.batch_size, mesh)
  parallel.local_batch_size(config.eval.batch_size, mesh)
  tx, schedule = optimizer_from_config(config, total)
  init_rng, train_rng, eval_rng = _rngs(config.seed)
  state = _init_state(model, tx, prepared.real_train.image_shape, mesh, init_rng)

  train_iter = input_pipeline.train_iterator_from_config(
    config.data,
    prepared.train_splits,
    batch_size=train_cfg.batch_size,
    eps=config.attack.eps,
    seed=config.seed,
    kept=kept,
    kept_eps=kept_eps,
  )
  # Refreshed margins (c.train.refresh_margins_every): eps of the kept examples from the
  # EMA weights' margins every N steps; the eps in use are the checkpoint item 'kept_eps'.
  refresher = margin_refresh.from_config(config, model, prepared.train_splits, kept, mesh)
  ckpt = checkpointing.Checkpointer(workdir / 'checkpoints', keep_last=2)
  pruning = pruning_item(kept, kept_eps)
  start = ckpt.latest_step()
  if start is not None:
    targets = {'state': checkpointing.abstract_target(state), 'data_iter': None, 'prune': None}
    if refresher is not None:
      targets[margin_refresh.CHECKPOINT_ITEM] = None
    start, restored = ckpt.restore_latest(
      targets, optional=('prune', margin_refresh.CHECKPOINT_ITEM)
    )
    if 'prune' in restored:
      check_same_pruning(restored['prune'], pruning, f'checkpoint {start} of {workdir}')
    state = restored['state']
    train_iter.set_state(restored['data_iter'])
    if margin_refresh.CHECKPOINT_ITEM in restored:
      train_iter.set_kept_eps(restored[margin_refresh.CHECKPOINT_ITEM])
    logging.info('resumed %s from step %d', workdir, start)
  start = start or 0
  writer = MetricWriter(workdir, resume_step=start if start else None)

  jit_train_step = make_jit_train_step(config, model, tx, schedule, mesh, total)
  meter = _step_meter(config, model, state, prepared.real_train.image_shape, mesh)

  def evaluate(step: int) -> dict[str, float]:
    result = evaluate_pgd(
      state.variables(ema=True),
      prepared.real_test,
      config=config,
      model=model,
      mesh=mesh,
      rng=eval_rng,
    )
    writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
    logging.info(
      'step %d: EMA clean accuracy %.4f, PGD-%d accuracy %.4f (%d test examples)',
      step,
      result['clean_accuracy'],
      config.eval.pgd_steps,
      result['pgd_accuracy'],
      result['num_examples'],
    )
    return result

  def save(step: int) -> None:
    items = {'state': state, 'data_iter': train_iter.get_state()}
    if pruning:
      items['prune'] = pruning
    if refresher is not None:
      items[margin_refresh.CHECKPOINT_ITEM] = train_iter.kept_eps
    ckpt.save(step, items)

  progress = Progress(f'train {workdir.name}', total, unit='steps', initial=start, every_s=30)
  history: list[dict[str, jax.Array]] = []

  def flush_metrics(step: int) -> None:
    if not history:
      return
    means = _mean_metrics(history)
    history.clear()
    if means.pop('nonfinite'):
      raise NonFiniteLossError(
        f'non-finite loss or gradient before step {step} of {workdir}; the train state was '
        f'not updated by those steps and the last good checkpoint '
        f'({ckpt.latest_step()}) is intact. Lower train.learning_rate or check the data, '
        'then rerun to resume from that checkpoint.'
      )
    writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
    extra = f'loss {means["loss"]:.4f}'
    rates = meter.read()  # timings stay out of metrics.jsonl: reruns must write the same rows
    if rates:
      extra += f', {rates["examples_per_s_per_device"]:.1f} examples/s per device'
      if 'mfu' in rates:
        extra += f', MFU {100 * rates["mfu"]:.1f}%'
    progress.update(0, extra=extra, force=True)

  result: dict[str, float] = {}
  try:
    for step in range(start + 1, total + 1):
      batch = input_pipeline.device_fields(next(train_iter), input_pipeline.TRAIN_FIELDS)
      batch = parallel.shard_batch(batch, mesh)
      state, metrics = jit_train_step(state, batch, train_rng)
      if step == start + 1:  # the meter's windows leave out the compilation
        jax.block_until_ready(metrics)
        meter.start()
      else:
        meter.step()
      history.append(metrics)
      progress.update(1)
      if refresher is not None and refresher.due(step, total):
        train_iter.set_kept_eps(refresher(state.variables(ema=True), train_iter.kept_eps))
        meter.start()
      if step % train_cfg.log_every_steps == 0 or step == total:
        flush_metrics(step)
      if step % train_cfg.checkpoint_every_steps == 0 or step == total:
        flush_metrics(step)  # Never checkpoint a state after a non-finite step.
        save(step)
      if step % train_cfg.eval_every_steps == 0 or step == total:
        result = evaluate(step)
        meter.start()
      if on_step is not None:
        on_step(step, state)
    if start >= total:
      result = _last_eval(writer.path)
      logging.info('%s already finished at step %d', workdir, start)
  finally:
    ckpt.wait_until_finished()
    ckpt.close()
    writer.close()
    train_iter.close()
  progress.close()
  return state, result


def pruning_item(
  kept: Mapping[str, np.ndarray] | None, kept_eps: Mapping[str, np.ndarray] | None
) -> dict[str, dict[str, str]]:
  """The pruning output a run trains on, as a JSON checkpoint item: its fingerprints.

  Returns:
    source -> {'kept': fingerprint of the kept ids (as int64), 'eps': fingerprint
    of their eps (as float32)} (`artifacts.tree_fingerprint`); empty without pruning.
  """
  item: dict[str, dict[str, str]] = {}
  for name, ids in (kept or {}).items():
    item.setdefault(name, {})['kept'] = artifacts.tree_fingerprint(np.asarray(ids, np.int64))
  for name, eps in (kept_eps or {}).items():
    item.setdefault(name, {})['eps'] = artifacts.tree_fingerprint(np.asarray(eps, np.float32))
  return item


def check_same_pruning(saved: Mapping[str, Any], given: Mapping[str, Any], where: str) -> None:
  """Raises ValueError naming the source and array where two `pruning_item`s differ."""
  if not given:
    raise ValueError(
      f'{where} was trained on a pruning output (kept examples, per-example eps) but none was '
      'given now; resume through the same pipeline command (its prune stage supplies it) or '
      'start a new workdir.'
    )
  for name in sorted(set(saved) | set(given)):
    for key in sorted(set(saved.get(name, {})) | set(given.get(name, {}))):
      if saved.get(name, {}).get(key) != given.get(name, {}).get(key):
        raise ValueError(
          f'{where} was trained on a different pruning output ({key!r} of source {name!r} '
          'differs from the one given now, e.g. WORKDIR/prune/kept.npz changed); resume with '
          'the pruning output it was trained on or start a new workdir.'
        )
