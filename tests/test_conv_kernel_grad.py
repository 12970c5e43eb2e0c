"""`layers.conv2d`'s kernel gradient on CPU (batch chunks, 1x1 as a matrix product) vs JAX's rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from puma_jax import parallel
from puma_jax.models import layers


def _jax_rule(x, kernel, g, strides, padding):
  conv = lambda k: jax.lax.conv_general_dilated(
    x, k, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  return jax.vjp(conv, kernel)[1](g)[0]


def _ours(x, kernel, g, strides, padding):
  return jax.vjp(lambda k: layers.conv2d(x, k, strides, padding), kernel)[1](g)[0]


def _inputs(batch, size, k, strides, padding, cin=3, cout=4, seed=0):
  rs = np.random.default_rng(seed)
  x = jnp.asarray(rs.standard_normal((batch, size, size, cin)), jnp.float32)
  kernel = jnp.asarray(rs.standard_normal((k, k, cin, cout)), jnp.float32)
  out = jax.eval_shape(lambda x, k: layers.conv2d(x, k, strides, padding), x, kernel)
  g = jnp.asarray(rs.standard_normal(out.shape), jnp.float32)
  return x, kernel, g


@pytest.mark.parametrize(
  'batch,size,k,strides,padding',
  [
    (17, 32, 3, (1, 1), ((1, 1), (1, 1))),  # 1024 positions per image: one image per chunk
    (12, 8, 3, (1, 1), ((1, 1), (1, 1))),  # a few images per chunk
    (21, 4, 3, (1, 1), ((1, 1), (1, 1))),  # the last chunk filled up with zero images
    (6, 16, 3, (2, 2), ((0, 1), (0, 1))),  # WRN downsampling conv (TF 'SAME')
    (5, 8, 3, (2, 2), ((0, 0), (0, 0))),  # the last input row is never read: cropped
    (5, 9, 5, (3, 2), ((2, 1), (0, 2))),
    (7, 7, 1, (2, 2), ((0, 0), (0, 0))),  # 1x1 shortcut on an odd size: a matrix product
    (3, 6, 1, (1, 1), ((1, 0), (0, 1))),  # 1x1 with padding: the padded border is zero
  ],
)
def test_kernel_gradient_equals_jax_rule(batch, size, k, strides, padding):
  x, kernel, g = _inputs(batch, size, k, strides, padding)
  got = jax.jit(_ours, static_argnums=(3, 4))(x, kernel, g, strides, padding)
  want = jax.jit(_jax_rule, static_argnums=(3, 4))(x, kernel, g, strides, padding)
  assert got.dtype == jnp.float32 and got.shape == kernel.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))


def test_cpu_path_chunks_in_a_loop_that_input_gradients_do_not_pay_for():
  strides, padding = (1, 1), ((1, 1), (1, 1))
  x, kernel, g = _inputs(8, 16, 3, strides, padding)
  kernel_grad = jax.jit(_ours, static_argnums=(3, 4)).lower(x, kernel, g, strides, padding)
  assert kernel_grad.compile().as_text().count(' while(') == 1  # the chunk loop runs here
  input_grad = jax.jit(
    lambda x, g: jax.vjp(lambda x: layers.conv2d(x, kernel, strides, padding), x)[1](g)[0]
  )
  # An attack's input gradient: the unused kernel gradient (and its loop) is removed.
  assert ' while(' not in input_grad.lower(x, g).compile().as_text()


def test_bfloat16_kernel_gradient():
  strides, padding = (2, 2), ((1, 1), (1, 1))
  x, kernel, g = _inputs(9, 16, 3, strides, padding, cin=8, cout=8)
  low = [v.astype(jnp.bfloat16) for v in (x, kernel, g)]
  got = jax.jit(_ours, static_argnums=(3, 4))(*low, strides, padding)
  want = jax.jit(_jax_rule, static_argnums=(3, 4))(x, kernel, g, strides, padding)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2 * float(jnp.abs(want).max()))


def test_sharded_batch_gives_the_same_kernel_gradient():
  strides, padding = (1, 1), ((1, 1), (1, 1))
  x, kernel, g = _inputs(8, 16, 3, strides, padding)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  batch = NamedSharding(mesh, PartitionSpec('data'))
  fn = jax.jit(_ours, static_argnums=(3, 4))
  want = fn(x, kernel, g, strides, padding)
  got = fn(jax.device_put(x, batch), kernel, jax.device_put(g, batch), strides, padding)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_kernel_gradient_of_a_sharded_batch_runs_on_each_devices_examples():
  strides, padding = (1, 1), ((1, 1), (1, 1))
  x, kernel, g = _inputs(16, 16, 3, strides, padding)
  mesh = parallel.make_mesh(jax.devices())
  batch = parallel.data_sharding(mesh)
  want = jax.jit(_ours, static_argnums=(3, 4))(x, kernel, g, strides, padding)
  fn = jax.jit(
    parallel.with_mesh(functools.partial(_ours, strides=strides, padding=padding), mesh),
    in_shardings=(batch, parallel.replicated(mesh), batch),
  )
  compiled = fn.lower(x, kernel, g).compile().as_text()
  # Each device loops over its own 4 examples (one chunk each; the first starts the sum):
  # no device gathers the others' rows.
  assert 'all-gather(' not in compiled and ' while(' in compiled
  got = fn(jax.device_put(x, batch), kernel, jax.device_put(g, batch))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
