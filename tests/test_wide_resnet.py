"""WideResNet: PyTorch-layout import against a NumPy reference forward, sizes, dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from puma_jax import models
from puma_jax.models import wide_resnet

# A tiny WRN-16-1: group 0 has identity shortcuts (16 -> 16 channels), groups 1 and
# 2 open with a strided 1x1 projection and continue with identity blocks.
DEPTH, WIDTH, NUM_CLASSES = 16, 1, 5


def _torch_state_dict(rng: np.random.Generator, *, depth: int, width: int, num_classes: int):
  """Random weights in the DM-Improves-AT WRN-Swish state_dict layout (PyTorch shapes)."""
  sd = {}

  def conv(key, out_c, in_c, k):
    sd[f'{key}.weight'] = rng.normal(0, np.sqrt(2.0 / (k * k * in_c)), (out_c, in_c, k, k))

  def bn(key, c):
    sd[f'{key}.weight'] = rng.uniform(0.5, 1.5, c)
    sd[f'{key}.bias'] = rng.normal(0, 0.2, c)
    sd[f'{key}.running_mean'] = rng.normal(0, 0.2, c)
    sd[f'{key}.running_var'] = rng.uniform(0.5, 2.0, c)
    sd[f'{key}.num_batches_tracked'] = np.array(1000)

  channels = [16, 16 * width, 32 * width, 64 * width]
  conv('init_conv', 16, 3, 3)
  n = (depth - 4) // 6
  for g in range(3):
    for i in range(n):
      c_in = channels[g] if i == 0 else channels[g + 1]
      c_out = channels[g + 1]
      p = f'layer.{g}.block.{i}'
      bn(f'{p}.batchnorm_0', c_in)
      conv(f'{p}.conv_0', c_out, c_in, 3)
      bn(f'{p}.batchnorm_1', c_out)
      conv(f'{p}.conv_1', c_out, c_out, 3)
      if c_in != c_out:
        conv(f'{p}.shortcut', c_out, c_in, 1)
  bn('batchnorm', channels[3])
  sd['logits.weight'] = rng.normal(0, 0.1, (num_classes, channels[3]))
  sd['logits.bias'] = rng.normal(0, 0.1, num_classes)
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _reference_forward(sd, x, *, depth, mean, std):
  """The PyTorch WRN-Swish forward (eval mode) written out in float64 NumPy, NHWC."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

  def conv(v, key, stride, pads):  # pads: (top, bottom, left, right) as F.pad / padding=
    w = sd[f'{key}.weight']
    top, bottom, left, right = pads
    v = np.pad(v, ((0, 0), (top, bottom), (left, right), (0, 0)))
    win = sliding_window_view(v, w.shape[2:], axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum('bhwcij,ocij->bhwo', win, w)

  def bn(v, key):
    inv = sd[f'{key}.weight'] / np.sqrt(sd[f'{key}.running_var'] + 1e-5)
    return (v - sd[f'{key}.running_mean']) * inv + sd[f'{key}.bias']

  def swish(v):
    return v / (1.0 + np.exp(-v))

  out = (np.asarray(x, np.float64) - np.asarray(mean)) / np.asarray(std)
  out = conv(out, 'init_conv', 1, (1, 1, 1, 1))
  for g in range(3):
    for i in range((depth - 4) // 6):
      p = f'layer.{g}.block.{i}'
      stride = 2 if g > 0 and i == 0 else 1
      has_shortcut = f'{p}.shortcut.weight' in sd
      x_in = out
      # Both paths convolve the activated input; only a projecting shortcut sees it too.
      a = swish(bn(x_in, f'{p}.batchnorm_0'))
      v = conv(a, f'{p}.conv_0', stride, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))
      v = swish(bn(v, f'{p}.batchnorm_1'))
      v = conv(v, f'{p}.conv_1', 1, (1, 1, 1, 1))
      shortcut = conv(a, f'{p}.shortcut', stride, (0, 0, 0, 0)) if has_shortcut else x_in
      out = shortcut + v
  out = swish(bn(out, 'batchnorm'))
  # F.avg_pool2d(out, 8) on the 8x8 map of a 32x32 input, then flatten.
  assert out.shape[1:3] == (8, 8)
  out = out.mean(axis=(1, 2))
  return out @ sd['logits.weight'].T + sd['logits.bias']


@pytest.fixture(scope='module')
def torch_weights():
  return _torch_state_dict(
    np.random.default_rng(0), depth=DEPTH, width=WIDTH, num_classes=NUM_CLASSES
  )


def test_torch_import_matches_numpy_reference(torch_weights, tmp_path):
  # Saved the way a DataParallel checkpoint is: every name under `module.`.
  path = tmp_path / 'wrn.npz'
  np.savez(path, **{f'module.{k}': v for k, v in torch_weights.items()})
  mean, std = wide_resnet.CIFAR100_MEAN, wide_resnet.CIFAR100_STD
  kwargs = dict(num_classes=NUM_CLASSES, depth=DEPTH, width=WIDTH, mean=mean, std=std)
  variables = models.import_torch_state_dict('wrn', str(path), **kwargs)
  model = models.create('wrn', activation='swish', **kwargs)

  x = np.random.default_rng(1).uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
  logits = model.apply(variables, jnp.asarray(x), train=False)
  want = _reference_forward(torch_weights, x, depth=DEPTH, mean=mean, std=std)

  chex.assert_shape(logits, (3, NUM_CLASSES))
  assert logits.dtype == jnp.float32
  assert np.std(want) > 0.1  # non-degenerate logits, so the comparison means something
  np.testing.assert_allclose(np.asarray(logits), want, rtol=2e-4, atol=2e-4)


def test_train_mode_uses_batch_statistics_with_momentum_099(torch_weights):
  kwargs = dict(num_classes=NUM_CLASSES, depth=DEPTH, width=WIDTH)
  variables = wide_resnet.convert_torch_state_dict(torch_weights)
  model = models.create('wrn', **kwargs)
  x = np.random.default_rng(2).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
  _, updates = model.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])

  # The first BatchNorm sees the stem's output, which the reference can compute exactly.
  sd = {k: v.astype(np.float64) for k, v in torch_weights.items()}
  z = (x - np.asarray(wide_resnet.CIFAR10_MEAN)) / np.asarray(wide_resnet.CIFAR10_STD)
  win = sliding_window_view(np.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2))
  stem = np.einsum('bhwcij,ocij->bhwo', win, sd['init_conv.weight'])
  old = sd['layer.0.block.0.batchnorm_0.running_mean']
  new = np.asarray(updates['batch_stats']['layer_0_block_0']['batchnorm_0']['mean'])
  np.testing.assert_allclose(new, 0.99 * old + 0.01 * stem.mean(axis=(0, 1, 2)), atol=1e-5)


def test_converter_rejects_weights_of_another_shape(torch_weights):
  with pytest.raises(ValueError, match='model.width'):
    wide_resnet.convert_torch_state_dict(
      torch_weights, num_classes=NUM_CLASSES, depth=DEPTH, width=2
    )
  with pytest.raises(ValueError, match='model.depth'):
    wide_resnet.convert_torch_state_dict(
      torch_weights, num_classes=NUM_CLASSES, depth=22, width=WIDTH
    )
  with pytest.raises(ValueError, match='logits.bias'):
    wide_resnet.convert_torch_state_dict(
      {k: v for k, v in torch_weights.items() if k != 'logits.bias'}
    )
  with pytest.raises(ValueError, match='does not use'):
    wide_resnet.convert_torch_state_dict({**torch_weights, 'extra.weight': np.zeros(3)})


def _param_count(depth: int, width: int, num_classes: int = 10, channels: int = 3) -> int:
  """Parameters of the PyTorch WRN (BN scale+bias, no conv bias), counted by hand."""
  c = [16, 16 * width, 32 * width, 64 * width]
  n = 16 * channels * 9
  for g in range(3):
    for i in range((depth - 4) // 6):
      c_in, c_out = (c[g] if i == 0 else c[g + 1]), c[g + 1]
      n += 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out
      n += c_in * c_out if c_in != c_out else 0
  return n + 2 * c[3] + c[3] * num_classes + num_classes


@pytest.mark.parametrize('depth,width,known', [(28, 10, 36_479_194), (70, 16, 266_796_506)])
def test_param_count(depth, width, known):
  # 36.5M (WRN-28-10) and 266.8M (WRN-70-16) as listed for these models on RobustBench.
  model = models.create('wrn', num_classes=10, depth=depth, width=width)
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
  )
  n = sum(v.size for v in jax.tree.leaves(shapes['params']))
  assert n == _param_count(depth, width) == known


def _all_eqns(jaxpr):
  """The equations of a jaxpr and of every jaxpr nested in them (custom_vjp, cond, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, 'eqns'):
          yield from _all_eqns(sub)


def test_bfloat16_compute_keeps_float32_params_and_logits(torch_weights):
  kwargs = dict(num_classes=NUM_CLASSES, depth=DEPTH, width=WIDTH)
  bf16 = models.create('wrn', dtype='bfloat16', **kwargs)
  f32 = models.create('wrn', **kwargs)
  x = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
  # Initialisation makes float32 parameters and statistics (shapes only: no compile).
  shapes = jax.eval_shape(lambda x: bf16.init(jax.random.key(0), x, train=False), x)
  for leaf in jax.tree.leaves(shapes):
    assert leaf.dtype == jnp.float32
  variables = jax.tree.map(jnp.asarray, wide_resnet.convert_torch_state_dict(torch_weights))

  def forward(model, v, train):
    if train:
      return model.apply(v, x, train=True, mutable=['batch_stats'])
    return model.apply(v, x, train=False), {}

  # The convolutions really run in bfloat16.
  jaxpr = jax.make_jaxpr(lambda v: forward(bf16, v, False))(variables)
  conv_dtypes = {
    eqn.outvars[0].aval.dtype
    for eqn in _all_eqns(jaxpr.jaxpr)
    if eqn.primitive.name == 'conv_general_dilated'
  }
  assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}
  logits, updates = jax.jit(lambda v: forward(bf16, v, True))(variables)
  assert logits.dtype == jnp.float32
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype == jnp.float32
  low, _ = jax.jit(lambda v: forward(bf16, v, False))(variables)
  high, _ = jax.jit(lambda v: forward(f32, v, False))(variables)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, atol=0.05 * float(jnp.abs(high).max()))


def test_bad_fields_name_the_config_field():
  x = jnp.zeros((1, 32, 32, 3))
  for kwargs, field in [
    ({'depth': 27}, 'model.depth'),
    ({'activation': 'sigmoidish'}, 'model.activation'),
    ({'mean': (0.5,), 'std': (0.5,)}, 'model.mean'),
  ]:
    model = models.create('wrn', num_classes=10, width=1, **{'depth': 10, **kwargs})
    with pytest.raises(ValueError, match=field):
      model.init(jax.random.key(0), x, train=False)


def test_convs_run_through_layers_conv_with_jax_gradients(torch_weights):
  """Every conv is a `layers.conv2d` (the CPU form, a custom VJP, chosen per platform), and
  the gradients equal JAX's own rules (the same model with `cpu_kernels=False`)."""
  model = models.create('wrn', num_classes=NUM_CLASSES, depth=DEPTH, width=WIDTH)
  plain = models.create('wrn', num_classes=NUM_CLASSES, depth=DEPTH, width=WIDTH, cpu_kernels=False)
  variables = jax.tree.map(jnp.asarray, wide_resnet.convert_torch_state_dict(torch_weights))
  x = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (3, 16, 16, 3)), jnp.float32)

  def make_loss(model):
    def loss(params, x):
      logits, _ = model.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(jnp.sin(logits))

    return loss

  loss = make_loss(model)
  jaxpr = jax.make_jaxpr(loss)(variables['params'], x).jaxpr
  top_level = [e for e in jaxpr.eqns if e.primitive.name == 'conv_general_dilated']
  switches = [e for e in jaxpr.eqns if e.primitive.name == 'cond']
  custom = [e for e in _all_eqns(jaxpr) if e.primitive.name == 'custom_vjp_call']
  num_convs = 3 * (DEPTH - 4) // 6 * 2 + 1 + 2  # + stem, shortcuts
  assert not top_level and len(switches) == len(custom) == num_convs
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
  plain_jaxpr = jax.make_jaxpr(make_loss(plain))(variables['params'], x).jaxpr
  assert not any(e.primitive.name in ('cond', 'custom_vjp_call') for e in plain_jaxpr.eqns)
  loss = make_loss(plain)
  want = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
  for (path, got), ref in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(want), strict=True):
    scale = float(jnp.max(jnp.abs(ref))) + 1e-6
    np.testing.assert_allclose(got, ref, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))
