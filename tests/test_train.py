"""The train step and loop: sharding invariance, exact resume, eps semantics, learning."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from puma_jax import datasets, parallel, steps, train
from puma_jax.attacks import losses


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  config = default.get_config('tiny')
  return datasets.prepare(config.data, tmp_path_factory.mktemp('data'))


def _config(**train_overrides):
  config = default.get_config('tiny')
  config.attack.num_steps = 2
  config.eval.pgd_steps = 2
  for k, v in train_overrides.items():
    setattr(config.train, k, v)
  return config


def _batch(prepared, n=16, seed=0):
  it = datasets.input_pipeline.train_iterator(
    prepared.train_splits, batch_size=n, eps=0.3, seed=seed, read_threads=0
  )
  batch = next(it)
  it.close()
  return batch


def _setup(config, prepared, mesh):
  model = train.create_model(config.model)
  tx, schedule = train.make_optimizer(config)
  state = train._init_state(model, tx, prepared.real_train.image_shape, mesh, jax.random.key(0))
  return model, tx, schedule, state


@pytest.mark.parametrize('loss', ['trades', 'pgd_at'])
def test_step_on_four_devices_equals_one_device_and_compiles_once(prepared, loss):
  config = _config(loss=loss)
  batch = _batch(prepared)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    model, tx, schedule, state = _setup(config, prepared, mesh)
    jit_step = train.make_jit_train_step(config, model, tx, schedule, mesh)
    for _ in range(2):
      state, metrics = jit_step(state, parallel.shard_batch(batch, mesh), jax.random.key(1))
    assert jit_step._cache_size() == 1
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p4, m4) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), p1, p4)
  for k in m1:
    np.testing.assert_allclose(m1[k], m4[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_step_on_four_devices_computes_each_devices_examples_once(prepared):
  config = _config()
  mesh = parallel.make_mesh(jax.devices())
  model, tx, schedule, state = _setup(config, prepared, mesh)
  jit_step = train.make_jit_train_step(config, model, tx, schedule, mesh)
  batch = parallel.shard_batch(_batch(prepared), mesh)
  compiled = jit_step.lower(state, batch, jax.random.key(1)).compile().as_text()
  # Gradients are summed over devices (all-reduce); no device gathers the others'
  # examples to repeat their work (as XLA would for the CPU kernel-gradient loop).
  assert 'all-gather(' not in compiled and 'all-reduce(' in compiled


def _clean_reference_step(config, model, tx, state, batch):
  """A plain clean-training step: CE on the clean batch, no attack."""

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=True)
    return jnp.mean(
      losses.cross_entropy(logits, batch['label'], label_smoothing=config.train.label_smoothing)
    )

  grads = jax.grad(loss_fn)(state.params)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  return jax.tree.map(lambda p, u: p + u, state.params, updates)


@pytest.mark.parametrize('loss', ['trades', 'pgd_at'])
def test_zero_eps_trains_exactly_clean(prepared, loss):
  config = _config(loss=loss)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model, tx, schedule, state = _setup(config, prepared, mesh)
  batch = {k: jnp.asarray(v) for k, v in _batch(prepared).items()}
  batch['eps'] = jnp.zeros_like(batch['eps'])
  expected = _clean_reference_step(config, model, tx, state, batch)
  step = functools.partial(
    steps.train_step,
    model=model,
    tx=tx,
    schedule=schedule,
    loss=loss,
    norm='linf',
    num_steps=3,
    step_size=0.25,
    trades_beta=5.0,
    label_smoothing=config.train.label_smoothing,
    ema_decay=0.995,
  )
  new_state, _ = jax.jit(step)(state, batch, jax.random.key(3))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    jax.device_get(new_state.params),
    jax.device_get(expected),
  )


@pytest.mark.parametrize('loss', ['trades', 'pgd_at'])
def test_zero_eps_rows_of_a_mixed_batch_are_not_perturbed(prepared, loss):
  config = _config()
  mesh = parallel.make_mesh(jax.devices()[:1])
  model, _, _, state = _setup(config, prepared, mesh)
  batch = {k: jnp.asarray(v) for k, v in _batch(prepared).items()}
  eps = jnp.where(jnp.arange(16) % 2 == 0, 0.0, 0.3)
  batch['eps'] = eps
  logits_fn = lambda x: model.apply(state.variables(), x, train=False)
  x_adv = steps.adversarial_inputs(
    logits_fn, jax.random.key(0), batch, loss=loss, norm='linf', num_steps=3, step_size=0.25
  )
  delta = np.abs(np.asarray(x_adv - batch['image'])).reshape(16, -1).max(axis=1)
  assert np.all(delta[::2] == 0.0)
  assert np.all(delta[1::2] > 0.0) and np.all(delta[1::2] <= 0.3 + 1e-6)


def test_nonfinite_loss_keeps_the_state(prepared):
  config = _config()
  mesh = parallel.make_mesh(jax.devices()[:1])
  model, tx, schedule, state = _setup(config, prepared, mesh)
  batch = _batch(prepared)
  batch['image'] = np.full_like(batch['image'], np.nan)
  jit_step = train.make_jit_train_step(config, model, tx, schedule, mesh)
  before = jax.device_get(state.params)
  new_state, metrics = jit_step(state, parallel.shard_batch(batch, mesh), jax.random.key(1))
  assert int(metrics['nonfinite']) == 1
  assert int(new_state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(new_state.params))


class _Stop(Exception):
  pass


def _read_metrics(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_resumed_run_equals_uninterrupted_run(prepared, tmp_path):
  config = _config(num_steps=6, checkpoint_every_steps=3, log_every_steps=1, eval_every_steps=3)
  state_a, result_a = train.train_and_evaluate(config, tmp_path / 'a', prepared=prepared)

  def stop_at_3(step, state):
    if step == 3:
      raise _Stop

  with pytest.raises(_Stop):
    train.train_and_evaluate(config, tmp_path / 'b', prepared=prepared, on_step=stop_at_3)
  state_b, result_b = train.train_and_evaluate(config, tmp_path / 'b', prepared=prepared)

  assert int(state_a.step) == int(state_b.step) == 6
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(state_a.params), jax.device_get(state_b.params)
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(state_a.ema_params),
    jax.device_get(state_b.ema_params),
  )
  assert result_a == result_b
  assert _read_metrics(tmp_path / 'a' / 'metrics.jsonl') == _read_metrics(
    tmp_path / 'b' / 'metrics.jsonl'
  )
  # A rerun after completion does no training and keeps the metrics.
  state_c, result_c = train.train_and_evaluate(config, tmp_path / 'b', prepared=prepared)
  assert result_c == result_a
  assert _read_metrics(tmp_path / 'b' / 'metrics.jsonl') == _read_metrics(
    tmp_path / 'a' / 'metrics.jsonl'
  )


def test_short_training_beats_chance(prepared, tmp_path):
  config = _config(num_steps=150, batch_size=64, learning_rate=0.05, warmup_steps=10)
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 150
  config.train.checkpoint_every_steps = 150
  config.attack.eps = 0.1
  config.attack.num_steps = 3
  config.eval.pgd_steps = 5
  config.eval.num_examples = 256
  _, result = train.train_and_evaluate(config, tmp_path, prepared=prepared)
  assert result['num_examples'] == 256
  assert result['clean_accuracy'] > 0.6, result
  assert result['pgd_accuracy'] > 0.3, result
