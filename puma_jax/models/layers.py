"""Layers whose input gradients stay fast inside loops: a 2-D conv and a 2x2 max-pool.

Attacks differentiate the model with respect to its input inside `lax.while_loop`
and `lax.fori_loop` (DeepFool, PGD, TRADES). There, XLA's CPU backend folds the
flip and transpose of the kernel in a conv's input gradient into the conv's
dimension numbers (kernel layout 'OI'), which its fast conv library (YNNPACK) does
not take, so the input gradient falls back to a generic conv that ran 2-3x slower
on the benchmark CPU than the same conv outside a loop. `conv2d` computes its input
gradient as an ordinary conv with an explicitly flipped and transposed kernel (an
optimisation barrier keeps XLA from folding it back), which keeps the library
path everywhere. Its weight gradient is JAX's own. Numerically both are the same
convolutions as JAX's rules; on accelerators they cost the same.

`max_pool_2x2` routes each window's cotangent to its first maximal element with
compares and selects, which fuse into elementwise code, instead of XLA's
select-and-scatter.

Both use `jax.custom_vjp`: reverse-mode (grad, vjp, jacrev) works, forward-mode
(jvp, jacfwd) does not.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
Padding = tuple[tuple[int, int], tuple[int, int]]


def _conv(x, kernel, strides, padding, lhs_dilation=(1, 1)):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    dimension_numbers=_DIMENSION_NUMBERS,
    preferred_element_type=None,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(
  x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
  """NHWC x HWIO 2-D convolution with explicit padding ((top, bottom), (left, right)).

  Args:
    x: [B,H,W,Cin] inputs.
    kernel: [kh,kw,Cin,Cout] weights.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) zero padding.

  Returns:
    [B,Ho,Wo,Cout] outputs, the same as `lax.conv_general_dilated`.
  """
  return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  # The input gradient is a conv of g with the flipped kernel, in/out channels swapped,
  # over g dilated by the strides (JAX's transpose rule, written out).
  pads = []
  for n, k, s, o, (lo, _) in zip(
    x.shape[1:3], (kh, kw), strides, g.shape[1:3], padding, strict=True
  ):
    before = k - 1 - lo
    pads.append((before, n + k - 1 - (1 + s * (o - 1)) - before))
  flipped = jax.lax.optimization_barrier(jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  dx = _conv(g, flipped, (1, 1), tuple(pads), lhs_dilation=strides)
  (dkernel,) = jax.vjp(lambda k: _conv(x, k, strides, padding), kernel)[1](g)
  return dx.astype(x.dtype), dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """`nn.Conv` for NHWC inputs with explicit padding and the loop-friendly `conv2d`.

  Parameters have nn.Conv's names and shapes (`kernel` [kh,kw,Cin,Cout], `bias`
  [Cout]) and stay float32; the computation runs in `dtype`.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = ((0, 0), (0, 0))
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', self.kernel_init, shape, jnp.float32)
    padding = tuple(tuple(int(p) for p in pair) for pair in self.padding)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides), padding)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 (VALID) over the H and W axes of `x` [B,H,W,C].

  Same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`. The VJP routes each
  window's cotangent to the window's first maximal element in row-major order
  (as PyTorch does).
  """
  return jnp.max(_windows(x), axis=(2, 4))


def _windows(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  x = x[:, : h - h % 2, : w - w % 2]  # VALID pooling drops an odd last row / column.
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _max_pool_2x2_fwd(x):
  out = jnp.max(_windows(x), axis=(2, 4))
  return out, (x, out)


def _max_pool_2x2_bwd(res, g):
  x, out = res
  win = _windows(x)
  is_max = win == out[:, :, None, :, None, :]
  m00 = is_max[:, :, 0, :, 0]
  m01 = is_max[:, :, 0, :, 1] & ~m00
  m10 = is_max[:, :, 1, :, 0] & ~(m00 | m01)
  m11 = ~(m00 | m01 | m10)
  first = jnp.stack([jnp.stack([m00, m01], axis=3), jnp.stack([m10, m11], axis=3)], axis=2)
  grad = jnp.where(first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  grad = grad.reshape(win.shape[0], 2 * win.shape[1], 2 * win.shape[3], win.shape[5])
  pad_h, pad_w = x.shape[1] - grad.shape[1], x.shape[2] - grad.shape[2]
  if pad_h or pad_w:
    grad = jnp.pad(grad, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  return (grad.astype(x.dtype),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def normalize(x: jax.Array, mean: Sequence[float] | None, std: Sequence[float] | None) -> jax.Array:
  """(x - mean) / std per channel in float32; identity when both are None."""
  x = x.astype(jnp.float32)
  if mean is None and std is None:
    return x
  mean = jnp.asarray(0.0 if mean is None else np.asarray(mean), jnp.float32)
  std = jnp.asarray(1.0 if std is None else np.asarray(std), jnp.float32)
  return (x - mean) / std
