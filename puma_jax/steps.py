"""Pure step functions: adversarial training with per-example eps, and evaluation.

Nothing here knows the mesh, Orbax or flags. `train.py` binds the static
choices with `functools.partial` and compiles the result with `jax.jit`
(`jit_train_step`), sharding the batch over the ('data',) mesh and donating
the state.

Each example i of a batch carries its own attack radius `batch['eps'][i]`:
- eps_i > 0: the inner maximisation searches the ball of radius eps_i;
- eps_i = 0: the example is trained clean (its input is not perturbed);
- eps_i < 0 (PUMA: the margin model misclassifies it): PGD-AT takes a
  *helpful* step down the loss within radius |eps_i|; TRADES trains it clean,
  since x itself minimises the KL term.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from puma_jax import attacks, schedules
from puma_jax.attacks import losses, lp

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Variables = dict[str, Any]

LOSSES = ('trades', 'pgd_at')
LR_SCHEDULES = ('warmup_cosine', 'cosinew')
WEIGHT_DECAY_ON = ('kernels', 'all_but_batchnorm')
ATTACK_BN = ('running', 'batch')


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (a pytree, no RNG)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  ema_params: Any
  ema_batch_stats: Any

  def variables(self, *, ema: bool = False) -> Variables:
    """Model variables for `apply`; `ema=True` gives the averaged weights used for evaluation."""
    params, stats = (
      (self.ema_params, self.ema_batch_stats) if ema else (self.params, self.batch_stats)
    )
    return {'params': params, 'batch_stats': stats} if stats else {'params': params}


def create_train_state(
  rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...]
) -> TrainState:
  """Initialises parameters (float32), BatchNorm statistics, optimiser state and EMA."""
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  # The averages start as copies: aliasing the same buffers would break donation.
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    ema_params=jax.tree.map(jnp.copy, params),
    ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
  )


def weight_decay_mask(params: Any) -> Any:
  """True for weight matrices and kernels; False for biases and BatchNorm scales/offsets."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _is_norm_layer(tree: Any) -> bool:
  return isinstance(tree, Mapping) and 'scale' in tree and 'kernel' not in tree


def all_but_batchnorm_mask(params: Any) -> Any:
  """True for every parameter except those of normalisation layers (modules with a `scale`).

  DM-Improves-AT's `group_weight`: kernels and the biases of convolutions and dense
  layers are decayed, BatchNorm scales and offsets are not.
  """

  def mark(tree, in_norm):
    if isinstance(tree, Mapping):
      in_norm = in_norm or _is_norm_layer(tree)
      return type(tree)({k: mark(v, in_norm) for k, v in tree.items()})
    return not in_norm

  return mark(params, False)


def make_optimizer(
  *,
  learning_rate: float,
  num_steps: int,
  warmup_steps: int,
  momentum: float,
  nesterov: bool,
  weight_decay: float,
  lr_schedule: str = 'warmup_cosine',
  steps_per_epoch: int = 0,
  pct_start: float = 0.025,
  weight_decay_on: str = 'kernels',
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD (Nesterov) with L2 weight decay and a learning-rate schedule.

  The decay is added to the gradient before momentum (as PyTorch's SGD `weight_decay`),
  on `weight_decay_on`: 'kernels' (`weight_decay_mask`: no biases, no BatchNorm) or
  'all_but_batchnorm' (`all_but_batchnorm_mask`, DM-Improves-AT).

  `lr_schedule`: 'warmup_cosine' is per step, a linear warm-up from 0 over
  `warmup_steps` then a cosine to 0 at `num_steps`, with the fixed `momentum`;
  'cosinew' is DM-Improves-AT's OneCycleLR stepped once per epoch of
  `steps_per_epoch` steps, warm-up share `pct_start`, with its cycled momentum
  (`schedules.one_cycle_per_epoch`; `momentum` and `warmup_steps` are not used).
  """
  if lr_schedule not in LR_SCHEDULES:
    raise ValueError(f'unknown train.lr_schedule {lr_schedule!r}; known: {LR_SCHEDULES}')
  if weight_decay_on not in WEIGHT_DECAY_ON:
    raise ValueError(f'unknown train.weight_decay_on {weight_decay_on!r}; known: {WEIGHT_DECAY_ON}')
  mask = weight_decay_mask if weight_decay_on == 'kernels' else all_but_batchnorm_mask
  if lr_schedule == 'cosinew':
    cycle = schedules.one_cycle_per_epoch(
      max_lr=learning_rate,
      num_steps=num_steps,
      steps_per_epoch=steps_per_epoch,
      pct_start=pct_start,
    )
    sgd = optax.inject_hyperparams(optax.sgd, static_args=('nesterov',))(
      learning_rate=cycle.learning_rate, momentum=cycle.momentum, nesterov=nesterov
    )
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=mask), sgd)
    return tx, cycle.learning_rate
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=min(warmup_steps, max(num_steps - 1, 0)),
    decay_steps=max(num_steps, 1),
  )
  tx = optax.chain(
    optax.add_decayed_weights(weight_decay, mask=mask),
    optax.sgd(learning_rate=schedule, momentum=momentum, nesterov=nesterov),
  )
  return tx, schedule


def ema_decay_at(step: jax.Array, decay: float, warmup_steps: float = 0.0) -> jax.Array:
  """The EMA decay applied by the update of 0-based step `step`.

  warmup_steps = 0: the usual ramp from the first step, min(decay, (1 + step) / (10 + step)).
  warmup_steps = W > 0 (DM-Improves-AT's `ema_update`): with n = step + 1 steps done,
  0 while n < W (the average is a copy of the model), then min(decay, (1 + d) / (10 + d))
  with d = n - W.
  """
  step = step.astype(jnp.float32)
  if warmup_steps <= 0:
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  delta = step + 1.0 - warmup_steps
  ramp = jnp.minimum(decay, (1.0 + delta) / (10.0 + jnp.maximum(delta, 0.0)))
  return jnp.where(delta >= 0, ramp, 0.0)


def attack_logits_fn(
  model: nn.Module, variables: Variables, batchnorm: str
) -> Callable[[jax.Array], jax.Array]:
  """The logits the inner maximisation attacks.

  batchnorm='running': eval mode, BatchNorm normalises with the running statistics
  (each example independent of the batch). 'batch' (DM-Improves-AT's
  `track_bn_stats(model, False)` in train mode): BatchNorm normalises with the
  statistics of the batch being attacked, and the running statistics are not updated
  (the update is computed and discarded).
  """
  if batchnorm not in ATTACK_BN:
    raise ValueError(f'unknown train.attack_batchnorm {batchnorm!r}; known: {ATTACK_BN}')
  if batchnorm == 'running' or 'batch_stats' not in variables:
    return lambda x: model.apply(variables, x, train=False)
  return lambda x: model.apply(variables, x, train=True, mutable=['batch_stats'])[0]


def adversarial_inputs(
  logits_fn: Callable[[jax.Array], jax.Array],
  rng: jax.Array,
  batch: Batch,
  *,
  loss: str,
  norm: str,
  num_steps: int,
  step_size: float,
  trades_start: str = 'normal',
) -> jax.Array:
  """The inner maximisation of `loss` ('trades' or 'pgd_at') with each example's `batch['eps']`."""
  x, y, eps = batch['image'], batch['label'], batch['eps']
  if loss == 'pgd_at':
    return attacks.pgd(
      lambda x_, y_: losses.cross_entropy(logits_fn(x_), y_),
      rng,
      x,
      y,
      eps,
      norm=norm,
      num_steps=num_steps,
      step_size=step_size,
    )
  return attacks.trades_perturb(
    logits_fn, rng, x, eps, norm=norm, num_steps=num_steps, step_size=step_size, start=trades_start
  )


def train_step(
  state: TrainState,
  batch: Batch,
  rng: jax.Array,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  loss: str,
  norm: str,
  num_steps: int,
  step_size: float,
  trades_beta: float,
  label_smoothing: float,
  ema_decay: float,
  ema_warmup_steps: float = 0.0,
  ema_batch_stats_every: int = 0,
  trades_start: str = 'normal',
  attack_batchnorm: str = 'running',
  bn_first_batch: bool = False,
) -> tuple[TrainState, Metrics]:
  """One step of adversarial training (TRADES or PGD-AT) with per-example eps. Pure.

  Args:
    state: the train state.
    batch: `image` f32[B,H,W,C] in [0,1], `label` i32[B], `eps` f32[B] (each
      example's radius; see the module docstring for zero and negative radii).
    rng: a base key; the step folds in `state.step`, so a resumed run draws
      the same random starts.
    model: the Flax module.
    tx, schedule: the optimiser and its learning-rate schedule (for metrics).
    loss: 'trades' (CE(f(x)) + beta KL(f(x) || f(x_adv))) or 'pgd_at' (CE(f(x_adv))).
    norm, num_steps, step_size: the inner attack; `step_size` is relative to |eps_i|.
    trades_beta, label_smoothing: loss weights (label smoothing on the CE terms).
    ema_decay: decay of the weight average used for evaluation.
    ema_warmup_steps: 0, or W > 0: the average copies the model for W steps, then
      ramps (`ema_decay_at`).
    ema_batch_stats_every: 0 averages the BatchNorm statistics like the weights; k > 0
      keeps them and copies the model's after every k-th step (DM-Improves-AT's
      `update_bn` at the end of each epoch of k steps).
    trades_start: TRADES' random start, 'normal' or 'uniform' (`attacks.trades_perturb`).
    attack_batchnorm: 'running' or 'batch', BatchNorm in the inner maximisation
      (`attack_logits_fn`); the attack never updates the running statistics.
    bn_first_batch: on step 0 the running statistics become the batch statistics
      (PyTorch momentum 1.0, DM-Improves-AT's Haiku-style start), instead of moving from
      their (0, 1) start by the model's momentum; needs a model with `bn_momentum`.

  Returns:
    The new state and scalar metrics. If the loss or the gradients are not
    finite, the state is returned unchanged and `metrics['nonfinite']` is 1.
  """
  if loss not in LOSSES:
    raise ValueError(f'unknown loss {loss!r} (config field train.loss); known: {LOSSES}')
  rng = jax.random.fold_in(rng, state.step)
  eval_vars = state.variables()

  def eval_logits(x):
    return model.apply(eval_vars, x, train=False)

  attack_logits = (
    eval_logits if loss == 'pgd_at' else attack_logits_fn(model, eval_vars, attack_batchnorm)
  )
  x_adv = jax.lax.stop_gradient(
    adversarial_inputs(
      attack_logits,
      rng,
      batch,
      loss=loss,
      norm=norm,
      num_steps=num_steps,
      step_size=step_size,
      trades_start=trades_start,
    )
  )
  y, eps = batch['label'], batch['eps']
  first_batch = _first_batch_rescale(model, state) if bn_first_batch else None

  def forward_train(params, batch_stats, x):
    variables = (
      {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}
    )
    if not batch_stats:
      return model.apply(variables, x, train=True), batch_stats
    if first_batch is not None:  # step 0: start from zeros, the update is (1 - m) * batch
      variables['batch_stats'] = jax.tree.map(
        lambda s: jnp.where(first_batch[0], jnp.zeros_like(s), s), batch_stats
      )
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    new = updates['batch_stats']
    if first_batch is not None:
      new = jax.tree.map(lambda s: jnp.where(first_batch[0], s / first_batch[1], s), new)
    return logits, new

  def loss_fn(params):
    if loss == 'pgd_at':
      logits_adv, new_stats = forward_train(params, state.batch_stats, x_adv)
      per_example = losses.cross_entropy(logits_adv, y, label_smoothing=label_smoothing)
      logits_clean = jax.lax.stop_gradient(eval_logits(batch['image']))
    else:
      # Two train-mode passes, as in TRADES and DM-Improves-AT: each normalises
      # with its own batch statistics and both update the running averages.
      logits_clean, stats = forward_train(params, state.batch_stats, batch['image'])
      logits_adv, new_stats = forward_train(params, stats, x_adv)
      # Radii <= 0 train clean (lp.split_eps): their KL term is exactly zero, gradient included.
      radius, _ = lp.split_eps(eps, helpful=False)
      logits_q = jnp.where((radius > 0)[:, None], logits_adv, logits_clean)
      per_example = losses.cross_entropy(
        logits_clean, y, label_smoothing=label_smoothing
      ) + trades_beta * losses.kl_divergence(logits_clean, logits_q)
    return jnp.mean(per_example), (new_stats, logits_clean, logits_adv)

  (loss_value, (new_stats, logits_clean, logits_adv)), grads = jax.value_and_grad(
    loss_fn, has_aux=True
  )(state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  decay = ema_decay_at(state.step, ema_decay, ema_warmup_steps)
  average = lambda ema, new: decay * ema + (1.0 - decay) * new
  if ema_batch_stats_every > 0:
    epoch_end = (state.step + 1) % ema_batch_stats_every == 0
    copy = lambda ema, new: jnp.where(epoch_end, new, ema)
    ema_stats = jax.tree.map(copy, state.ema_batch_stats, new_stats)
  else:
    ema_stats = jax.tree.map(average, state.ema_batch_stats, new_stats)
  new_state = state.replace(
    step=state.step + 1,
    params=new_params,
    batch_stats=new_stats,
    opt_state=new_opt_state,
    ema_params=jax.tree.map(average, state.ema_params, new_params),
    ema_batch_stats=ema_stats,
  )
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
  # Keep the last good state: a non-finite step changes nothing, the loop stops.
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)

  metrics = {
    'loss': loss_value,
    'clean_accuracy': jnp.mean(jnp.argmax(logits_clean, -1) == y),
    'adversarial_accuracy': jnp.mean(jnp.argmax(logits_adv, -1) == y),
    'mean_eps': jnp.mean(eps),
    'fraction_eps_nonpositive': jnp.mean(eps <= 0),
    'grad_norm': grad_norm,
    'learning_rate': schedule(state.step),
    'nonfinite': (~finite).astype(jnp.int32),
  }
  return new_state, metrics


def _first_batch_rescale(model: nn.Module, state: TrainState) -> tuple[jax.Array, float] | None:
  """(is step 0, 1 - the model's BatchNorm momentum) for `bn_first_batch`, or None (no BN)."""
  if not state.batch_stats:
    return None
  momentum = getattr(model, 'bn_momentum', None)
  if momentum is None or not 0.0 <= momentum < 1.0:
    raise ValueError(
      f'train.bn_first_batch=True needs a model with a `bn_momentum` field in [0, 1); '
      f'{type(model).__name__} has {momentum!r}. Set --config.train.bn_first_batch=False.'
    )
  return state.step == 0, 1.0 - momentum


def eval_step(
  variables: Variables,
  batch: Batch,
  rng: jax.Array,
  *,
  model: nn.Module,
  norm: str,
  eps: float,
  num_steps: int,
  step_size: float,
) -> Metrics:
  """Clean and PGD (cross-entropy) correct counts on one padded batch. Pure.

  Returns sums, not means, so that a padded last batch stays exact:
  `count`, `clean_correct`, `pgd_correct` over the rows where `batch['mask']`
  (the column sums of `eval_flags` with PGD-CE started from `rng`).
  """
  flags = eval_flags(
    variables,
    batch,
    jnp.expand_dims(rng, 0),
    model=model,
    norm=norm,
    eps=eps,
    num_steps=num_steps,
    step_size=step_size,
    pgd_attacks=('pgd_ce',),
  ).astype(jnp.float32)
  return {
    'count': jnp.sum(batch['mask'].astype(jnp.float32)),
    'clean_correct': jnp.sum(flags[:, 0]),
    # An example counts as robust only if it is also classified correctly clean.
    'pgd_correct': jnp.sum(flags[:, 1]),
  }


def eval_flags(
  variables: Variables,
  batch: Batch,
  keys: jax.Array,
  *,
  model: nn.Module,
  norm: str,
  eps: float,
  num_steps: int,
  step_size: float,
  pgd_attacks: tuple[str, ...] = ('pgd_ce', 'pgd_cw'),
) -> jax.Array:
  """Per example: classified correctly clean, and under PGD with each loss. Pure.

  Args:
    variables: the model's variables (eval mode).
    batch: `image` f32[B,H,W,C] in [0,1], `label` i32[B], `mask` bool[B] (False on
      padding rows).
    keys: key[len(pgd_attacks)], the random start of each PGD.
    model: the Flax module.
    norm, eps: the threat model (one radius for every example).
    num_steps, step_size: PGD's budget (step size relative to eps).
    pgd_attacks: PGD attacks by loss, each on every example: 'pgd_ce' (cross-entropy),
      'pgd_cw' (CW margin loss).

  Returns:
    bool[B, 1 + len(pgd_attacks)]: column 0 clean, then one column per attack. An
    example counts as robust only if it is also classified correctly clean; padding
    rows are False, so column sums are exact counts for a padded last batch.
  """
  loss_fns = {'pgd_ce': losses.cross_entropy, 'pgd_cw': losses.cw_loss}
  unknown = [a for a in pgd_attacks if a not in loss_fns]
  if unknown:
    raise ValueError(f'unknown PGD attacks {unknown}; known: {sorted(loss_fns)}')

  def logits_fn(x):
    return model.apply(variables, x, train=False)

  x, y = batch['image'], batch['label']
  radius = jnp.full(y.shape, eps, jnp.float32)
  clean = jnp.argmax(logits_fn(x), -1) == y
  flags = [clean]
  for i, name in enumerate(pgd_attacks):
    x_adv = attacks.pgd(
      lambda v, t, loss=loss_fns[name]: loss(logits_fn(v), t),
      keys[i],
      x,
      y,
      radius,
      norm=norm,
      num_steps=num_steps,
      step_size=step_size,
    )
    flags.append(clean & (jnp.argmax(logits_fn(x_adv), -1) == y))
  return jnp.stack(flags, axis=1) & batch['mask'].astype(bool)[:, None]
