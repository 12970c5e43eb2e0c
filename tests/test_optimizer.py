"""The optimiser: weight-decay mask, SGD-Nesterov update, learning-rate schedule and EMA."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import train_step_fn

from configs import default
from puma_jax import models, steps, train

# A small WideResNet with BatchNorm (conv kernels, BN scales/offsets, a dense layer with a bias).
WRN = dict(name='wrn', num_classes=10, depth=10, width=1, mean=(0.5,), std=(0.5,))


def _wrn_variable_shapes():
  model = models.create(**WRN)
  x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _random_like(shapes, seed=0):
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rs.randn(*s.shape), jnp.float32), shapes)


def _is_kernel(path):
  return jax.tree_util.keystr(path).endswith("['kernel']")


def _two_zero_gradient_updates(tx, params):
  """The updates of steps 0 and 1 of `tx` when every gradient is zero."""

  @jax.jit
  def updates(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt_state = tx.init(params)
    u0, opt_state = tx.update(zeros, opt_state, params)
    u1, _ = tx.update(zeros, opt_state, optax.apply_updates(params, u0))
    return u0, u1

  return updates(params)


def test_weight_decay_mask_selects_conv_and_dense_kernels_not_biases_or_batchnorm():
  params = _wrn_variable_shapes()['params']
  mask = {
    jax.tree_util.keystr(p): m
    for p, m in jax.tree.leaves_with_path(steps.weight_decay_mask(params))
  }
  # Every kind of leaf is there: conv kernels (4-D), the dense kernel (2-D), its bias, BN params.
  for path in (
    "['init_conv']['kernel']",
    "['layer_1_block_0']['shortcut']['kernel']",
    "['logits']['kernel']",
    "['logits']['bias']",
    "['layer_0_block_0']['batchnorm_0']['scale']",
    "['batchnorm']['bias']",
  ):
    assert path in mask, sorted(mask)
  for path, decayed in mask.items():
    assert decayed == path.endswith("['kernel']"), path


def test_zero_gradient_updates_are_nesterov_sgd_of_the_decay_on_kernels_only():
  lr, warmup, momentum, wd = 0.4, 2, 0.9, 0.05
  tx, _ = steps.make_optimizer(
    learning_rate=lr,
    num_steps=10,
    warmup_steps=warmup,
    momentum=momentum,
    nesterov=True,
    weight_decay=wd,
  )
  params = _random_like(_wrn_variable_shapes()['params'])
  u0, u1 = _two_zero_gradient_updates(tx, params)
  # Gradient g = wd * p for kernels. Step 0: learning rate 0 (warm-up from 0), trace t = g.
  # Step 1 (Nesterov): t = g + m * t = (1 + m) g; update = -lr_1 (g + m * t), lr_1 = lr / warmup.
  lr_1 = lr / warmup
  factor = -lr_1 * wd * (1 + momentum + momentum**2)
  leaves = jax.tree.leaves_with_path(params)
  assert sum(_is_kernel(path) for path, _ in leaves) >= 8
  for (path, p), a, b in zip(leaves, jax.tree.leaves(u0), jax.tree.leaves(u1), strict=True):
    name = jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, 0.0, err_msg=name)
    if _is_kernel(path):
      np.testing.assert_allclose(b, factor * np.asarray(p, np.float64), rtol=1e-5, err_msg=name)
    else:
      np.testing.assert_array_equal(b, 0.0, err_msg=name)
      np.testing.assert_array_equal(optax.apply_updates(p, b), p, err_msg=name)


def test_schedule_warms_up_linearly_then_decays_to_zero_along_a_cosine():
  peak = 0.1
  _, schedule = steps.make_optimizer(
    learning_rate=peak,
    num_steps=20,
    warmup_steps=4,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
  )
  expected = {
    0: 0.0,
    1: peak / 4,
    2: peak / 2,  # warm-up midpoint
    4: peak,  # end of the warm-up
    8: peak * 0.5 * (1 + math.cos(math.pi / 4)),  # a quarter of the 16 cosine steps
    12: peak / 2,  # cosine midpoint
    20: 0.0,  # num_steps
  }
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6, abs=1e-9), step


def test_warmup_longer_than_the_run_still_reaches_the_peak():
  _, schedule = steps.make_optimizer(
    learning_rate=0.1,
    num_steps=3,
    warmup_steps=10,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
  )
  got = [float(schedule(s)) for s in range(4)]
  np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.0], rtol=1e-6, atol=1e-9)


def test_train_optimizer_from_config_takes_every_setting_from_the_config():
  config = default.get_config('tiny')
  config.train.learning_rate = 0.2
  config.train.num_steps = 12
  config.train.warmup_steps = 4
  config.train.momentum = 0.8
  config.train.nesterov = False
  config.train.weight_decay = 0.01
  tx, schedule = train.optimizer_from_config(config)
  for step, lr in {2: 0.1, 4: 0.2, 8: 0.1, 12: 0.0}.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6, abs=1e-9), step
  _, shorter = train.optimizer_from_config(config, num_steps=8)
  assert float(shorter(6)) == pytest.approx(0.1, rel=1e-6)
  params = {'dense': {'kernel': jnp.full((2, 3), 2.0), 'bias': jnp.ones((3,))}}
  _, u1 = _two_zero_gradient_updates(tx, params)
  # Plain momentum: t = g + m * t = (1 + m) g is the update; g = wd * p, lr_1 = 0.2 / 4.
  np.testing.assert_allclose(u1['dense']['kernel'], -0.05 * 0.01 * 1.8 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(u1['dense']['bias'], 0.0)


@pytest.mark.parametrize('step,expected', [(0, 0.1), (10, 0.55), (10000, 0.995)])
def test_ema_decay_warms_up_to_the_configured_decay(step, expected):
  got = steps.ema_decay_at(jnp.asarray(step, jnp.int32), 0.995)
  assert float(got) == pytest.approx(expected, rel=1e-6)


def _random_batch(n=8, seed=0):
  rs = np.random.RandomState(seed)
  return {
    'image': jnp.asarray(rs.rand(n, 28, 28, 1), jnp.float32),
    'label': jnp.asarray(rs.randint(0, 10, n), jnp.int32),
    'index': jnp.arange(n, dtype=jnp.int32),
    'source': jnp.zeros(n, jnp.int32),
    'eps': jnp.full(n, 0.3, jnp.float32),
  }


def _first_step(loss='trades', **model_overrides):
  """A fresh state and the state after one `steps.train_step` of the tiny config."""
  config = default.get_config('tiny')
  config.train.warmup_steps = 0  # A non-zero learning rate at step 0: the parameters move.
  for k, v in model_overrides.items():
    setattr(config.model, k, v)
  model = train.create_model(config.model)
  tx, schedule = train.optimizer_from_config(config)
  init = functools.partial(steps.create_train_state, model=model, tx=tx, image_shape=(28, 28, 1))
  state = jax.jit(init)(jax.random.key(0))
  step = train_step_fn(
    model,
    tx,
    schedule=schedule,
    loss=loss,
    num_steps=1,
    trades_beta=config.train.trades_beta,
    label_smoothing=config.train.label_smoothing,
    ema_decay=config.train.ema_decay,
  )
  new_state, metrics = jax.jit(step)(state, _random_batch(), jax.random.key(1))
  assert int(metrics['nonfinite']) == 0
  return jax.device_get(state), jax.device_get(new_state)


def _assert_averaged(ema, old_ema, new, decay):
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), old_ema, new)
  assert all(jax.tree.leaves(moved))
  jax.tree.map(
    lambda e, o, n: np.testing.assert_allclose(
      e, decay * o + (1 - decay) * n, rtol=1e-6, atol=1e-7
    ),
    ema,
    old_ema,
    new,
  )


def test_first_train_step_averages_params_with_the_warm_up_decay():
  old, new = _first_step()
  assert int(new.step) == 1
  # ema_decay_at(0) = min(0.995, 1 / 10).
  _assert_averaged(new.ema_params, old.ema_params, new.params, decay=0.1)


def test_first_train_step_averages_batchnorm_statistics_like_the_params():
  old, new = _first_step('pgd_at', **WRN)
  assert jax.tree.leaves(new.ema_batch_stats)
  _assert_averaged(new.ema_params, old.ema_params, new.params, decay=0.1)
  _assert_averaged(new.ema_batch_stats, old.ema_batch_stats, new.batch_stats, decay=0.1)
