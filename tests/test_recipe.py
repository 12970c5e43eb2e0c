"""The DM-Improves-AT recipe options (docs/recipe.md) against closed-form values."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import train_step_fn

from configs import cifar10_wrn28_10, default
from puma_jax import attacks, models, steps


def _torch_one_cycle(epoch, *, max_lr, total_steps, pct_start):
  """torch.optim.lr_scheduler.OneCycleLR.get_lr (defaults, two phases), written out.

  Returns (lr, momentum) after `epoch` scheduler steps.
  """
  initial_lr = max_lr / 25.0
  min_lr = initial_lr / 1e4
  phases = [
    dict(end_step=float(pct_start * total_steps) - 1, lr=(initial_lr, max_lr), mom=(0.95, 0.85)),
    dict(end_step=total_steps - 1, lr=(max_lr, min_lr), mom=(0.85, 0.95)),
  ]

  def anneal(start, end, pct):
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

  start_step = 0
  for i, phase in enumerate(phases):
    end_step = phase['end_step']
    if epoch <= end_step or i == len(phases) - 1:
      pct = (epoch - start_step) / (end_step - start_step)
      return anneal(*phase['lr'], pct), anneal(*phase['mom'], pct)
    start_step = phase['end_step']
  raise AssertionError


@pytest.mark.parametrize(
  'epochs,steps_per_epoch,step',
  [
    (400, 98, 0),
    (400, 98, 97),  # last step of epoch 0: still epoch 0's values
    (400, 98, 98),
    (400, 98, 9 * 98 + 3),  # the peak (warm-up ends at epoch 0.025 * 400 - 1 = 9)
    (400, 98, 10 * 98),
    (400, 98, 200 * 98 + 50),
    (400, 98, 399 * 98 + 97),  # the last step: min_lr, momentum back to 0.95
    (10, 7, 0),  # warm-up shorter than one epoch: annealing from the first epoch
    (10, 7, 36),
  ],
)
def test_cosinew_is_torch_one_cycle_stepped_once_per_epoch(epochs, steps_per_epoch, step):
  tx, schedule = steps.make_optimizer(
    learning_rate=0.2,
    num_steps=epochs * steps_per_epoch,
    warmup_steps=0,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    lr_schedule='cosinew',
    steps_per_epoch=steps_per_epoch,
    pct_start=0.025,
  )
  lr, mom = _torch_one_cycle(
    step // steps_per_epoch, max_lr=0.2, total_steps=epochs, pct_start=0.025
  )
  assert float(schedule(step)) == pytest.approx(lr, rel=1e-5, abs=1e-9)
  # The optimiser applies that learning rate and momentum at this step.
  params = {'w': jnp.zeros(3)}

  @jax.jit
  def state_at(state):
    return jax.lax.fori_loop(0, step, lambda _, s: tx.update(params, s, params)[1], state)

  _, new = tx.update({'w': jnp.ones(3)}, state_at(tx.init(params)), params)
  hp = new[1].hyperparams
  assert float(hp['learning_rate']) == pytest.approx(lr, rel=1e-5, abs=1e-9)
  assert float(hp['momentum']) == pytest.approx(mom, rel=1e-6)


def test_cosinew_momentum_is_the_sgd_momentum():
  tx, _ = steps.make_optimizer(
    learning_rate=0.2,
    num_steps=400,
    warmup_steps=0,
    momentum=0.9,
    nesterov=False,
    weight_decay=0.0,
    lr_schedule='cosinew',
    steps_per_epoch=1,
    pct_start=0.025,
  )
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  g = {'w': jnp.ones(())}
  u0, state = tx.update(g, state, params)
  u1, _ = tx.update(g, state, params)
  lr0, m0 = _torch_one_cycle(0, max_lr=0.2, total_steps=400, pct_start=0.025)
  lr1, m1 = _torch_one_cycle(1, max_lr=0.2, total_steps=400, pct_start=0.025)
  # PyTorch SGD: buf = m * buf + g, p -= lr * buf.
  assert float(u0['w']) == pytest.approx(-lr0 * 1.0, rel=1e-6)
  assert float(u1['w']) == pytest.approx(-lr1 * (m1 * 1.0 + 1.0), rel=1e-6)
  assert m0 == pytest.approx(0.95) and m1 < 0.95


def test_weight_decay_on_all_but_batchnorm():
  model = models.create('wrn', num_classes=10, depth=10, width=1, mean=(0.5,), std=(0.5,))
  x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)['params']
  mask = {
    jax.tree_util.keystr(p): m
    for p, m in jax.tree.leaves_with_path(steps.all_but_batchnorm_mask(params))
  }
  for path, decayed in (
    ("['init_conv']['kernel']", True),
    ("['logits']['kernel']", True),
    ("['logits']['bias']", True),
    ("['layer_0_block_0']['batchnorm_0']['scale']", False),
    ("['layer_0_block_0']['batchnorm_0']['bias']", False),
  ):
    assert mask[path] is decayed, path
  assert sum(not m for m in mask.values()) == sum('batchnorm' in k for k in mask)


@pytest.mark.parametrize('warmup', [10.5, 4.0])
def test_ema_is_a_copy_until_the_warm_up_then_the_dm_ramp(warmup):
  for step in range(30):
    n = step + 1  # DM-Improves-AT's global_step after the update
    expected = 0.0 if n < warmup else min(0.995, (1 + n - warmup) / (10 + n - warmup))
    got = float(steps.ema_decay_at(jnp.asarray(step), 0.995, warmup))
    assert got == pytest.approx(expected, rel=1e-6, abs=0), step
  # 0 keeps this project's ramp from step 0.
  assert float(steps.ema_decay_at(jnp.asarray(0), 0.995, 0.0)) == pytest.approx(0.1)


class _BNNet(nn.Module):
  """BatchNorm on the input itself, so its statistics have a closed form."""

  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _batch(eps, n=16, seed=0):
  rs = np.random.RandomState(seed)
  return {
    'image': jnp.asarray(rs.rand(n, 4, 4, 2), jnp.float32),
    'label': jnp.asarray(rs.randint(0, 10, n), jnp.int32),
    'eps': jnp.full(n, eps, jnp.float32),
  }


def _run(num_train_steps, batches, **options):
  model = _BNNet()
  tx = optax.sgd(0.1)
  state = steps.create_train_state(jax.random.key(0), model, tx, (4, 4, 2))
  step = jax.jit(train_step_fn(model, tx, **options))
  states = [state]
  for i in range(num_train_steps):
    state, metrics = step(state, batches[i], jax.random.key(i))
    assert int(metrics['nonfinite']) == 0
    states.append(state)
  return states


def _moments(x):
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return x.mean(0), x.var(0)


@pytest.mark.parametrize('bn_first_batch', [False, True])
def test_batchnorm_statistics_after_step_0_and_1(bn_first_batch):
  m = _BNNet.bn_momentum
  batches = [_batch(0.0, seed=0), _batch(0.0, seed=1)]  # eps 0: x_adv = x
  states = _run(2, batches, bn_first_batch=bn_first_batch)
  mean0, var0 = _moments(batches[0]['image'])
  mean1, var1 = _moments(batches[1]['image'])
  stats = [jax.device_get(s.batch_stats['BatchNorm_0']) for s in states]
  # TRADES: two train-mode passes (clean, then adversarial), each one running-average update.
  if bn_first_batch:  # PyTorch momentum 1.0 on step 0: the batch's own statistics.
    want_mean, want_var = mean0, var0
  else:  # from (0, 1)
    want_mean, want_var = (1 - m * m) * mean0, m * m + (1 - m * m) * var0
  np.testing.assert_allclose(stats[1]['mean'], want_mean, rtol=1e-5)
  np.testing.assert_allclose(stats[1]['var'], want_var, rtol=1e-5)
  # Step 1 uses the model's momentum in both cases.
  np.testing.assert_allclose(stats[2]['mean'], m * m * want_mean + (1 - m * m) * mean1, rtol=1e-5)
  np.testing.assert_allclose(stats[2]['var'], m * m * want_var + (1 - m * m) * var1, rtol=1e-5)


def test_batchnorm_first_batch_needs_a_model_momentum():
  class NoField(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.Dense(10)(nn.BatchNorm(use_running_average=not train)(x).reshape(len(x), -1))

  model, tx = NoField(), optax.sgd(0.1)
  state = steps.create_train_state(jax.random.key(0), model, tx, (4, 4, 2))
  with pytest.raises(ValueError, match='bn_first_batch'):
    train_step_fn(model, tx, num_steps=1, bn_first_batch=True)(
      state, _batch(0.1), jax.random.key(0)
    )


def test_attack_batchnorm_batch_mode_uses_batch_statistics_and_updates_nothing():
  model = _BNNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
  x = _batch(0.1)['image']
  batch_mode = steps.attack_logits_fn(model, variables, 'batch')(x)
  train_mode, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  eval_mode = model.apply(variables, x, train=False)
  np.testing.assert_allclose(batch_mode, train_mode, rtol=1e-6)
  assert not np.allclose(batch_mode, eval_mode, atol=1e-3)
  np.testing.assert_allclose(
    steps.attack_logits_fn(model, variables, 'running')(x), eval_mode, rtol=1e-6
  )
  # Inside a train step: a tiny radius makes x_adv ~ x, so the running statistics
  # after the step are exactly those of the two train-mode passes; an attack that
  # updated them (3 more passes) would leave m^5 of the start instead of m^2.
  m = _BNNet.bn_momentum
  batch = _batch(1e-6)
  states = _run(1, [batch], attack_batchnorm='batch')
  mean, var = _moments(batch['image'])
  stats = jax.device_get(states[1].batch_stats['BatchNorm_0'])
  np.testing.assert_allclose(stats['mean'], (1 - m * m) * mean, rtol=1e-4)
  np.testing.assert_allclose(stats['var'], m * m + (1 - m * m) * var, rtol=1e-4)


def test_ema_batch_stats_copied_at_each_epoch_end_and_ema_copies_during_warm_up():
  batches = [_batch(0.0, seed=i) for i in range(3)]
  states = _run(3, batches, ema_batch_stats_every=2, ema_warmup_steps=2.5)
  get = lambda s: jax.device_get((s.params, s.batch_stats, s.ema_params, s.ema_batch_stats))
  p = [get(s) for s in states]
  # Copies, up to XLA computing the model's value and its copy in two fusions.
  same = lambda a, b: jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), a, b
  )
  same(p[1][3], p[0][3])  # step 0 is not an epoch end: the initial statistics
  same(p[2][3], p[2][1])  # step 1 ends epoch 0: the model's statistics, copied
  same(p[3][3], p[2][3])
  # n = 1, 2 < 2.5 steps: copies of the model; n = 3: decay (1 + 0.5) / (10 + 0.5).
  same(p[1][2], p[1][0])
  same(p[2][2], p[2][0])
  d = 1.5 / 10.5
  jax.tree.map(
    lambda e, o, n: np.testing.assert_allclose(e, d * o + (1 - d) * n, rtol=1e-6, atol=1e-7),
    p[3][2],
    p[2][2],
    p[3][0],
  )


@pytest.mark.parametrize('start', ['normal', 'uniform'])
def test_trades_start(start):
  x = jnp.asarray(np.random.RandomState(0).rand(64, 8, 8, 3), jnp.float32)
  eps = jnp.full(64, 8 / 255, jnp.float32).at[:4].set(0.0)
  x_adv = attacks.trades_perturb(
    lambda v: v.reshape(64, -1)[:, :10],
    jax.random.key(0),
    x,
    eps,
    norm='linf',
    num_steps=0,
    step_size=0.25,
    start=start,
  )
  delta = np.asarray(x_adv - x)
  np.testing.assert_array_equal(delta[:4], 0.0)  # eps <= 0 trains clean
  assert np.all(np.abs(delta) <= 8 / 255 + 1e-7) and np.all((x_adv >= 0) & (x_adv <= 1))
  inner = (np.asarray(x) > 8 / 255) & (np.asarray(x) < 1 - 8 / 255)
  spread = np.abs(delta[4:][inner[4:]])
  if start == 'uniform':  # U(-eps, eps): mean |delta| = eps / 2
    assert spread.mean() == pytest.approx(4 / 255, rel=0.05)
  else:  # 0.001 N(0, 1): mean |delta| = 0.001 sqrt(2 / pi)
    assert spread.mean() == pytest.approx(0.001 * math.sqrt(2 / math.pi), rel=0.05)


def test_cifar_config_is_the_dm_recipe_and_default_keeps_its_behaviour():
  c = cifar10_wrn28_10.get_config()
  t = c.train
  assert (t.lr_schedule, t.steps_per_epoch, t.pct_start) == ('cosinew', 98, 0.025)
  assert (t.weight_decay_on, t.ema_warmup_fraction, t.ema_batch_stats) == (
    'all_but_batchnorm',
    0.025,
    'copy_each_epoch',
  )
  assert (t.trades_start, t.attack_batchnorm, t.bn_first_batch) == ('uniform', 'batch', True)
  # DM-Improves-AT's L-inf TRADES: 10 steps of eps/4 (2/255), whatever the base's default.
  assert (c.attack.num_steps, c.attack.step_size, t.trades_step_size) == (10, 0.25, 0.0)
  l2 = cifar10_wrn28_10.get_config('l2').train
  assert (l2.trades_start, l2.trades_step_size) == ('normal', pytest.approx(2 / 10))
  d = default.get_config().train
  assert (d.lr_schedule, d.weight_decay_on, d.ema_warmup_fraction, d.ema_batch_stats) == (
    'warmup_cosine',
    'kernels',
    0.0,
    'average',
  )
  assert (d.trades_start, d.attack_batchnorm, d.bn_first_batch) == ('normal', 'running', False)
  # The embedded default's own attack: 5 TRADES steps of eps/2, PGD evaluation steps of eps/4.
  assert (default.get_config().attack.num_steps, d.trades_step_size) == (5, 0.5)
