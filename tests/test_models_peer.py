"""SmallCNN and PreActResNet18 against a NumPy NCHW (PyTorch-semantics) forward of the same weights.

The weights are random, written in the PyTorch state_dict layout (OIHW convs,
(out, in) linears, BatchNorm running statistics), so no torch is needed.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puma_jax import models
from puma_jax.models import layers, preact_resnet, small_cnn

PEER_CNN = dict(conv_channels=(32, 64, 128), pool_after=(False, True, True), dense_widths=(256,))


# ---------------------------------------------------------------- NumPy reference (NCHW)
def _conv(x, w, b=None, stride=1, pad=1):
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  kh, kw = w.shape[2:]
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
  y = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
  return y if b is None else y + b[None, :, None, None]


def _bn(x, sd, key, eps=1e-5):
  g = lambda n: sd[f'{key}.{n}'][None, :, None, None]
  return (x - g('running_mean')) / np.sqrt(g('running_var') + eps) * g('weight') + g('bias')


def _relu(x):
  return np.maximum(x, 0)


def _maxpool(x):
  n, c, h, w = x.shape
  return x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def _cnn_forward(sd, x, pool_after, num_dense):
  for i, pool in enumerate(pool_after):
    x = _relu(_conv(x, sd[f'conv{i + 1}.weight'], sd[f'conv{i + 1}.bias']))
    x = _maxpool(x) if pool else x
  x = x.reshape(len(x), -1)  # PyTorch's NCHW flatten: index c*H*W + h*W + w.
  for j in range(num_dense + 1):
    x = x @ sd[f'fc{j + 1}.weight'].T + sd[f'fc{j + 1}.bias']
    x = _relu(x) if j < num_dense else x
  return x


def _resnet_forward(sd, x):
  x = _conv(x, sd['conv1.weight'])
  for i, stride in enumerate((1, 2, 2, 2)):
    for j in range(2):
      p = f'layer{i + 1}.{j}'
      o = _relu(_bn(x, sd, f'{p}.bn1'))
      sc = _conv(o, sd[f'{p}.shortcut.0.weight'], stride=stride, pad=0) if j == 0 and i else x
      o = _conv(o, sd[f'{p}.conv1.weight'], stride=stride if j == 0 else 1)
      x = _conv(_relu(_bn(o, sd, f'{p}.bn2')), sd[f'{p}.conv2.weight']) + sc
  x = _relu(_bn(x, sd, 'bn')).mean(axis=(2, 3))
  return x @ sd['linear.weight'].T + sd['linear.bias']


# ---------------------------------------------------------------- random torch-layout weights
def _cnn_state_dict(rs, in_ch, conv_channels, dense_widths, feature_hw, num_classes=10):
  sd, c = {}, in_ch
  for i, o in enumerate(conv_channels):
    sd[f'conv{i + 1}.weight'] = rs.randn(o, c, 3, 3) / np.sqrt(9 * c)
    sd[f'conv{i + 1}.bias'] = rs.randn(o) * 0.1
    c = o
  n_in = c * feature_hw * feature_hw
  for j, o in enumerate(list(dense_widths) + [num_classes]):
    sd[f'fc{j + 1}.weight'] = rs.randn(o, n_in) / np.sqrt(n_in)
    sd[f'fc{j + 1}.bias'] = rs.randn(o) * 0.1
    n_in = o
  return {k: v.astype(np.float32) for k, v in sd.items()}


def _resnet_state_dict(rs, width, num_classes=10):
  sd = {'conv1.weight': rs.randn(width, 3, 3, 3) / np.sqrt(27)}

  def bn(key, c):
    sd[f'{key}.weight'] = 1 + 0.1 * rs.randn(c)
    sd[f'{key}.bias'] = 0.1 * rs.randn(c)
    sd[f'{key}.running_mean'] = 0.1 * rs.randn(c)
    sd[f'{key}.running_var'] = rs.uniform(0.5, 1.5, c)
    sd[f'{key}.num_batches_tracked'] = np.array(3)

  c = width
  for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
    planes = width * mult
    for j in range(2):
      p = f'layer{i + 1}.{j}'
      bn(f'{p}.bn1', c)
      sd[f'{p}.conv1.weight'] = rs.randn(planes, c, 3, 3) / np.sqrt(9 * c)
      bn(f'{p}.bn2', planes)
      sd[f'{p}.conv2.weight'] = rs.randn(planes, planes, 3, 3) / np.sqrt(9 * planes)
      if j == 0 and (stride != 1 or c != planes):
        sd[f'{p}.shortcut.0.weight'] = rs.randn(planes, c, 1, 1) / np.sqrt(c)
      c = planes
  bn('bn', c)
  sd['linear.weight'] = rs.randn(num_classes, c) / np.sqrt(c)
  sd['linear.bias'] = 0.1 * rs.randn(num_classes)
  return {
    k: np.asarray(v, np.int64 if k.endswith('tracked') else np.float32) for k, v in sd.items()
  }


def _apply(model, variables, x_nchw):
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


# ---------------------------------------------------------------- tests
def test_peer_small_cnn_matches_numpy_reference(tmp_path):
  rs = np.random.RandomState(0)
  sd = _cnn_state_dict(rs, 3, PEER_CNN['conv_channels'], PEER_CNN['dense_widths'], 8)
  x = rs.rand(3, 3, 32, 32).astype(np.float32)
  np.savez(tmp_path / 'w.npz', **sd)
  variables = models.import_torch_state_dict('small_cnn', str(tmp_path / 'w.npz'), **PEER_CNN)
  model = models.create('small_cnn', num_classes=10, **PEER_CNN)
  expected = _cnn_forward({k: v.astype(np.float64) for k, v in sd.items()}, x, (0, 1, 1), 1)
  np.testing.assert_allclose(_apply(model, variables, x), expected, atol=2e-5, rtol=1e-4)


def test_default_small_cnn_is_a_small_mnist_model():
  rs = np.random.RandomState(1)
  model = small_cnn.SmallCNN()
  sd = _cnn_state_dict(rs, 1, model.conv_channels, model.dense_widths, 7)
  x = rs.rand(4, 1, 28, 28).astype(np.float32)
  variables = small_cnn.convert_torch_state_dict(sd)
  expected = _cnn_forward({k: v.astype(np.float64) for k, v in sd.items()}, x, (1, 1), 1)
  np.testing.assert_allclose(_apply(model, variables, x), expected, atol=2e-5, rtol=1e-4)
  # ~1-3 MFLOP per example, counted by XLA on the compiled forward pass.
  fwd = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, jnp.zeros((1, 28, 28, 1)))
  flops = fwd.compile().cost_analysis()['flops']
  assert 1e6 <= flops <= 3e6, flops


def test_preact_resnet18_matches_numpy_reference():
  rs = np.random.RandomState(2)
  sd = _resnet_state_dict(rs, width=16)
  x = rs.rand(2, 3, 32, 32).astype(np.float32)
  variables = preact_resnet.convert_torch_state_dict(sd, width=16, num_classes=10)
  model = models.create('preact_resnet18', num_classes=10, width=16)
  expected = _resnet_forward({k: v.astype(np.float64) for k, v in sd.items()}, x)
  np.testing.assert_allclose(_apply(model, variables, x), expected, atol=2e-5, rtol=1e-4)
  # The converted tree is exactly the one the model initialises (no missing or extra leaves).
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, init)


def test_resnet_train_mode_updates_batch_stats_and_dtype():
  model = preact_resnet.PreActResNet18(num_classes=10, width=4, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.RandomState(3).rand(4, 32, 32, 3), jnp.float32)
  # Converted random weights: jit(model.init) of a ResNet compiles its RNG code for ~30 s on CPU.
  sd = _resnet_state_dict(np.random.RandomState(3), 4)
  variables = preact_resnet.convert_torch_state_dict(sd, width=4)
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  logits, updates = train_apply(variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (4, 10)
  moved = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'], updates['batch_stats']
  )
  assert all(jax.tree.leaves(moved))
  # bfloat16 compute, float32 parameters: close to the float32 model's eval logits.
  f32 = preact_resnet.PreActResNet18(num_classes=10, width=4)
  bf16_logits = model.apply(variables, x, train=False)
  np.testing.assert_allclose(bf16_logits, f32.apply(variables, x, train=False), atol=0.1, rtol=0.1)


def test_normalisation_inside_the_model():
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  plain = small_cnn.SmallCNN(conv_channels=(4,), pool_after=(True,), dense_widths=())
  normed = small_cnn.SmallCNN(
    conv_channels=(4,), pool_after=(True,), dense_widths=(), mean=mean, std=std
  )
  x = jnp.asarray(np.random.RandomState(4).rand(2, 8, 8, 3), jnp.float32)
  variables = plain.init(jax.random.key(0), x)
  np.testing.assert_allclose(
    normed.apply(variables, x),
    plain.apply(variables, (x - jnp.array(mean)) / jnp.array(std)),
    rtol=1e-6,
  )


def test_max_pool_vjp_matches_xla_and_routes_ties_to_the_first_maximum():
  x = jnp.asarray(np.random.RandomState(5).randn(2, 6, 7, 3), jnp.float32)  # odd width
  g = jnp.asarray(np.random.RandomState(6).randn(2, 3, 3, 3), jnp.float32)
  ref_fn = lambda v: jax.lax.reduce_window(
    v, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID'
  )
  out, vjp = jax.vjp(layers.max_pool_2x2, x)
  ref_out, ref_vjp = jax.vjp(ref_fn, x)
  np.testing.assert_array_equal(out, ref_out)
  np.testing.assert_array_equal(vjp(g)[0], ref_vjp(g)[0])
  tie = jnp.zeros((1, 2, 2, 1)).at[0, 1, 1, 0].set(-1.0)  # three tied maxima
  (grad,) = jax.vjp(layers.max_pool_2x2, tie)[1](jnp.ones((1, 1, 1, 1)))
  np.testing.assert_array_equal(grad[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_converters_name_the_offending_tensor():
  rs = np.random.RandomState(7)
  sd = _cnn_state_dict(rs, 3, PEER_CNN['conv_channels'], PEER_CNN['dense_widths'], 8)
  missing = {k: v for k, v in sd.items() if k != 'conv2.bias'}
  with pytest.raises(ValueError, match='conv2.bias'):
    small_cnn.convert_torch_state_dict(missing, **PEER_CNN)
  with pytest.raises(ValueError, match='conv1.weight'):
    small_cnn.convert_torch_state_dict(sd, conv_channels=(16, 64, 128), pool_after=(0, 1, 1))
  with pytest.raises(ValueError, match='extra.weight'):
    small_cnn.convert_torch_state_dict({**sd, 'extra.weight': np.zeros(2)}, **PEER_CNN)
  rsd = _resnet_state_dict(rs, width=8)
  with pytest.raises(ValueError, match=r"'conv1.weight' has shape \(8, 3, 3, 3\).*width=16"):
    preact_resnet.convert_torch_state_dict(rsd, width=16)
  del rsd['layer3.0.shortcut.0.weight']
  with pytest.raises(ValueError, match='layer3.0.shortcut.0.weight'):
    preact_resnet.convert_torch_state_dict(rsd, width=8)


@pytest.mark.parametrize(
  'k,stride,padding,size',
  [
    (3, (1, 1), ((1, 1), (1, 1)), 8),
    (3, (2, 2), ((1, 1), (1, 1)), 8),  # ResNet downsampling conv
    (3, (2, 2), ((1, 1), (1, 1)), 7),
    (1, (2, 2), ((0, 0), (0, 0)), 8),  # ResNet shortcut
    (1, (2, 2), ((0, 0), (0, 0)), 7),
    (3, (2, 1), ((0, 2), (1, 0)), 9),
    (5, (3, 3), ((2, 1), (0, 2)), 10),
  ],
)
def test_conv2d_gradients_equal_jax_rules(k, stride, padding, size):
  rs = np.random.RandomState(8)
  x = jnp.asarray(rs.randn(2, size, size, 3), jnp.float32)
  kernel = jnp.asarray(rs.randn(k, k, 3, 5), jnp.float32)
  ref = lambda x, w: jax.lax.conv_general_dilated(
    x, w, stride, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  out, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, stride, padding), x, kernel)
  ref_out, ref_vjp = jax.vjp(ref, x, kernel)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rs.randn(*out.shape), jnp.float32)
  for got, want in zip(vjp(g), ref_vjp(g), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_preact_resnet18_weights_load_from_an_npz_file(tmp_path):
  sd = _resnet_state_dict(np.random.RandomState(9), width=16)
  path = tmp_path / 'w.npz'
  np.savez(path, **sd)
  loaded = models.import_torch_state_dict('preact_resnet18', str(path), width=16, num_classes=10)
  expected = preact_resnet.convert_torch_state_dict(sd, width=16, num_classes=10)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), loaded, expected)
  missing = tmp_path / 'missing.npz'
  with pytest.raises(ValueError, match=re.escape(str(missing))):
    models.import_torch_state_dict('preact_resnet18', str(missing), width=16)
