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

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from puma_jax import attacks
from puma_jax.attacks import losses, lp

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Variables = dict[str, Any]

LOSSES = ('trades', 'pgd_at')


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


def make_optimizer(
  *,
  learning_rate: float,
  num_steps: int,
  warmup_steps: int,
  momentum: float,
  nesterov: bool,
  weight_decay: float,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD (Nesterov) with L2 weight decay on kernels only, linear warm-up then cosine decay.

  The decay is added to the gradient before momentum (as PyTorch's SGD `weight_decay`);
  biases and BatchNorm scales and offsets are not decayed (`weight_decay_mask`).
  """
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=min(warmup_steps, max(num_steps - 1, 0)),
    decay_steps=max(num_steps, 1),
  )
  tx = optax.chain(
    optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
    optax.sgd(learning_rate=schedule, momentum=momentum, nesterov=nesterov),
  )
  return tx, schedule


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay with the usual warm-up: min(decay, (1 + step) / (10 + step))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def adversarial_inputs(
  logits_fn: Callable[[jax.Array], jax.Array],
  rng: jax.Array,
  batch: Batch,
  *,
  loss: str,
  norm: str,
  num_steps: int,
  step_size: float,
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
    logits_fn, rng, x, eps, norm=norm, num_steps=num_steps, step_size=step_size
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
) -> tuple[TrainState, Metrics]:
  """One step of adversarial training (TRADES or PGD-AT) with per-example eps. Pure.

  Args:
    state: the train state.
    batch: `image` f32[B,H,W,C] in [0,1], `label` i32[B], `eps` f32[B] (each
      example's radius; see the module docstring for zero and negative radii).
    rng: a base key; the step folds in `state.step`, so a resumed run draws
      the same random starts.
    model: the Flax module; its `train=False` mode (running BatchNorm
      statistics, nothing updated) is used by the attack.
    tx, schedule: the optimiser and its learning-rate schedule (for metrics).
    loss: 'trades' (CE(f(x)) + beta KL(f(x) || f(x_adv))) or 'pgd_at' (CE(f(x_adv))).
    norm, num_steps, step_size: the inner attack; `step_size` is relative to |eps_i|.
    trades_beta, label_smoothing: loss weights (label smoothing on the CE terms).
    ema_decay: decay of the weight average used for evaluation.

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

  x_adv = jax.lax.stop_gradient(
    adversarial_inputs(
      eval_logits, rng, batch, loss=loss, norm=norm, num_steps=num_steps, step_size=step_size
    )
  )
  y, eps = batch['label'], batch['eps']

  def forward_train(params, batch_stats, x):
    variables = (
      {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}
    )
    if not batch_stats:
      return model.apply(variables, x, train=True), batch_stats
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return logits, updates['batch_stats']

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

  decay = ema_decay_at(state.step, ema_decay)
  average = lambda ema, new: decay * ema + (1.0 - decay) * new
  new_state = state.replace(
    step=state.step + 1,
    params=new_params,
    batch_stats=new_stats,
    opt_state=new_opt_state,
    ema_params=jax.tree.map(average, state.ema_params, new_params),
    ema_batch_stats=jax.tree.map(average, state.ema_batch_stats, new_stats),
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
