"""A 2-D conv and a 2x2 max-pool: plain XLA ops on accelerators, fast-gradient forms on XLA:CPU.

On TPUs and GPUs (and everywhere with `cpu_kernels=False`) `conv2d` is
`lax.conv_general_dilated` and `max_pool_2x2` is a `lax.reduce_window` max, both
differentiated by JAX's own rules: the lowered program holds no optimisation
barrier, no chunk loop and no custom VJP, and forward mode (`jax.jvp`) works.
With `cpu_kernels=True` (config field `model.cpu_kernels`, the default) the CPU
workarounds below replace them when, and only when, the program is lowered for
CPU: the choice is `lax.platform_dependent`, made at lowering, so a program
exported for TPU or CUDA from a CPU host contains only the plain ops. The
values are the same on every path; the parameters are the same.

The CPU workarounds. Attacks differentiate the model with respect to its input
inside `lax.while_loop` and `lax.fori_loop` (DeepFool, PGD, TRADES). There,
XLA's CPU backend folds the flip and transpose of the kernel in a conv's input
gradient into the conv's dimension numbers (kernel layout 'OI'), which its fast
conv library (YNNPACK) does not take, so the input gradient falls back to a
generic conv that ran 2-3x slower on the benchmark CPU than the same conv
outside a loop. The CPU conv computes its input gradient as an ordinary conv
with an explicitly flipped and transposed kernel (an optimisation barrier keeps
XLA from folding it back), which keeps the library path everywhere.
Numerically it is the same convolution as JAX's rule.

Its kernel gradient (training's backward pass): JAX's rule, one conv that
contracts over the whole batch with an image-sized window, ran at a third of the
forward conv's speed on the benchmark CPU; the CPU conv sums the same conv over
chunks of the batch in a loop instead (about 256 output positions per chunk),
and writes a 1x1 kernel's gradient as a matrix product, which brings it to the
forward conv's speed (`_kernel_grad_cpu`). With the batch split over several
devices, that loop runs on each device's own examples and the devices' sums are
added (`parallel.sum_over_batch_shards`, inside `parallel.with_mesh`, which the
train step uses); XLA's partitioner would otherwise gather the whole batch on
every device for the loop. When only the input gradient is used (attacks), the
kernel gradient is never computed.

The CPU max-pool routes each window's cotangent to its first maximal element
with compares and selects, which fuse into elementwise code, instead of XLA's
select-and-scatter.

Both CPU forms use `jax.custom_vjp`: reverse mode (grad, vjp, jacrev) works,
forward mode (jvp, jacfwd) does not. `platform_dependent` traces every branch,
so with `cpu_kernels=True` forward mode fails on every platform; set
`cpu_kernels=False` for it.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from puma_jax import parallel, vma

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


def conv2d(
  x: jax.Array,
  kernel: jax.Array,
  strides: tuple[int, int],
  padding: Padding,
  cpu_kernels: bool = True,
) -> jax.Array:
  """NHWC x HWIO 2-D convolution with explicit padding ((top, bottom), (left, right)).

  Args:
    x: [B,H,W,Cin] inputs.
    kernel: [kh,kw,Cin,Cout] weights.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) zero padding.
    cpu_kernels: lowered for CPU, use `conv2d_cpu` (see the module docstring);
      False: `lax.conv_general_dilated` with JAX's rules on every platform.

  Returns:
    [B,Ho,Wo,Cout] outputs, the same as `lax.conv_general_dilated`.
  """
  plain = functools.partial(_conv, strides=strides, padding=padding)
  if not cpu_kernels:
    return plain(x, kernel)
  cpu = lambda x, kernel: conv2d_cpu(x, kernel, strides, padding)
  return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=plain)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_cpu(
  x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
  """`conv2d`'s XLA:CPU form: the same values, input and kernel gradients fast on XLA:CPU."""
  return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, res, g):
  x, kernel = res
  if tuple(strides) == (1, 1):
    dx = _input_grad_stride1(g, kernel, x.shape[1:3], padding)
  else:
    dx = _input_grad_strided(g, kernel, x.shape[1:3], strides, padding)
  dkernel = _kernel_grad_cpu(x, g, kernel, strides=strides, padding=padding)
  # Inside jax.shard_map: a replicated kernel's gradient summed over the devices.
  return vma.sum_like(dx.astype(x.dtype), x), vma.sum_like(dkernel, kernel)


# Output positions (batch x Ho x Wo) per chunk of the CPU kernel gradient. On the benchmark
# CPU, 64-512 were about equally fast for the PreAct ResNet-18's convs at batch 128; 1024 and
# more were slower on its 8x8 and 4x4 maps (4x4, 512 channels: 74-80 GFLOP/s at 64-256
# positions, 52 at 1024, 29 at 2048).
_KERNEL_GRAD_ROWS = 256


def _kernel_grad_cpu(x, g, kernel, *, strides, padding):
  """d(conv)/d(kernel) on XLA:CPU: `_kernel_grad_chunked` on each device's examples, summed."""
  chunked = functools.partial(_kernel_grad_chunked, strides=strides, padding=padding)
  return parallel.sum_over_batch_shards(chunked, (x, g), (kernel,))


def _kernel_grad_chunked(x, g, kernel, *, strides, padding):
  """d(conv)/d(kernel) [kh,kw,Cin,Cout] on XLA:CPU, summed over chunks of the batch.

  JAX's rule is one conv whose contraction runs over the whole batch and all
  output positions (B*Ho*Wo, e.g. 131072 rows) with a window as large as the
  image; XLA:CPU's conv library ran it at a third of the forward conv's speed.
  Chunks of about `_KERNEL_GRAD_ROWS` positions, summed in a loop, run at the
  forward's speed. The chunk's operands are transposed explicitly behind an
  optimisation barrier: inside a loop XLA would otherwise fold the transposes
  into the conv's dimension numbers, which the fast library does not take.
  1x1 kernels are a plain matrix product X^T G.
  """
  kh, kw, cin, cout = kernel.shape
  b, ho, wo, _ = g.shape
  chunk = 1 if kh == kw == 1 else min(b, max(1, _KERNEL_GRAD_ROWS // (ho * wo)))
  extra = -b % chunk  # zero examples fill the last chunk; they add nothing to the sum
  # Pad (or crop) x to exactly the rows and columns the output windows read.
  pads = [(0, extra, 0)]
  for n, k, s, (lo, _), o in zip(x.shape[1:3], (kh, kw), strides, padding, (ho, wo), strict=True):
    pads.append((lo, (o - 1) * s + k - n - lo, 0))
  xp = jax.lax.pad(x, jnp.zeros((), x.dtype), (*pads, (0, 0, 0)))
  if kh == kw == 1:
    xs = xp[:, :: strides[0], :: strides[1]].reshape(-1, cin)
    dk = jax.lax.dot_general(
      xs, g.reshape(-1, cout), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return dk.reshape(1, 1, cin, cout).astype(kernel.dtype)
  g = jnp.pad(g, ((0, extra), (0, 0), (0, 0), (0, 0)))

  def chunk_grad(i):
    xi = jax.lax.dynamic_slice_in_dim(xp, i * chunk, chunk)  # [m, Hp, Wp, Cin]
    gi = jax.lax.dynamic_slice_in_dim(g, i * chunk, chunk)  # [m, Ho, Wo, Cout]
    # The batch becomes the contraction: x as [Cin, Hp, Wp, m], g as a kernel [Ho, Wo, m, Cout].
    xt, gt = jax.lax.optimization_barrier((xi.transpose(3, 1, 2, 0), gi.transpose(1, 2, 0, 3)))
    dk = jax.lax.conv_general_dilated(
      xt,
      gt,
      window_strides=(1, 1),
      padding=((0, 0), (0, 0)),
      rhs_dilation=strides,
      dimension_numbers=_DIMENSION_NUMBERS,
      preferred_element_type=jnp.float32,
    )  # [Cin, kh, kw, Cout]
    return dk

  # The first chunk starts the sum (not zeros): the carry then has the type of the data,
  # which `jax.shard_map`'s check_vma requires of a loop inside it.
  dk = jax.lax.fori_loop(1, (b + extra) // chunk, lambda i, acc: acc + chunk_grad(i), chunk_grad(0))
  return dk.transpose(1, 2, 0, 3).astype(kernel.dtype)


def _flip_transpose(kernel: jax.Array) -> jax.Array:
  """[kh,kw,Cin,Cout] -> [kh,kw,Cout,Cin] flipped in space, materialised (not foldable)."""
  return jax.lax.optimization_barrier(jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))


def _input_grad_stride1(g, kernel, in_hw, padding):
  """d(conv)/dx for stride 1: a conv of g with the flipped, transposed kernel."""
  pads = []
  for n, k, o, (lo, _) in zip(in_hw, kernel.shape[:2], g.shape[1:3], padding, strict=True):
    before = k - 1 - lo
    pads.append((before, n + k - 1 - o - before))
  return _conv(g, _flip_transpose(kernel), (1, 1), tuple(pads))


def _input_grad_strided(g, kernel, in_hw, strides, padding):
  """d(conv)/dx for strides s > 1, as s_h * s_w stride-1 convs, one per output phase.

  Input row i = s*q + a only receives the kernel taps k = s*m + c with
  c = (a + pad) mod s, so phase a is a stride-1 conv of g with the sub-kernel
  kernel[c::s]; interleaving the phases gives dx. Unlike the dilated conv of JAX's
  rule, which multiplies by the zeros inserted between the rows of g (s*s times
  the work) and runs outside YNNPACK on CPU, this does only the needed work.
  """
  b, cout = g.shape[0], kernel.shape[3]
  cin = kernel.shape[2]
  phases_h = _phases(in_hw[0], kernel.shape[0], strides[0], padding[0][0], g.shape[1])
  phases_w = _phases(in_hw[1], kernel.shape[1], strides[1], padding[1][0], g.shape[2])
  q_h, q_w = max(p[3] for p in phases_h), max(p[3] for p in phases_w)
  rows = []
  for c_h, lo_h, hi_h, n_h in phases_h:
    cols = []
    for c_w, lo_w, hi_w, n_w in phases_w:
      sub = kernel[c_h :: strides[0], c_w :: strides[1]]
      if sub.shape[0] == 0 or sub.shape[1] == 0:
        part = jnp.zeros((b, n_h, n_w, cin), g.dtype)
      else:
        gp = jax.lax.pad(
          g, jnp.zeros((), g.dtype), ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0))
        )
        part = _conv(gp, _flip_transpose(sub), (1, 1), ((0, 0), (0, 0)))
      cols.append(jnp.pad(part, ((0, 0), (0, q_h - n_h), (0, q_w - n_w), (0, 0))))
    rows.append(jnp.stack(cols, axis=3))  # [B, q_h, q_w, s_w, Cin]
  dx = jnp.stack(rows, axis=2)  # [B, q_h, s_h, q_w, s_w, Cin]
  dx = dx.reshape(b, q_h * strides[0], q_w * strides[1], cin)
  del cout
  return dx[:, : in_hw[0], : in_hw[1]]


def _phases(n, k, s, pad_lo, len_g):
  """Per output phase a < s of one spatial axis: (first tap c, pad lo, pad hi, rows)."""
  out = []
  for a in range(s):
    c = (a + pad_lo) % s
    taps = len(range(c, k, s))
    t = (a + pad_lo - c) // s
    rows = -(-(n - a) // s)  # ceil((n - a) / s)
    lo = taps - 1 - t
    hi = rows - len_g - lo + taps - 1
    out.append((c, lo, hi, rows))
  return out


conv2d_cpu.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """`nn.Conv` for NHWC inputs with explicit padding, computed by `conv2d`.

  Parameters have nn.Conv's names and shapes (`kernel` [kh,kw,Cin,Cout], `bias`
  [Cout]) and stay float32; the computation runs in `dtype`. `cpu_kernels`: the
  XLA:CPU form when lowered for CPU (see `conv2d`); it changes no parameter.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = ((0, 0), (0, 0))
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros
  cpu_kernels: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', self.kernel_init, shape, jnp.float32)
    padding = tuple(tuple(int(p) for p in pair) for pair in self.padding)
    y = conv2d(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      tuple(self.strides),
      padding,
      cpu_kernels=self.cpu_kernels,
    )
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


def resnet_conv(dtype: Any, cpu_kernels: bool) -> Callable[..., Conv]:
  """`Conv` as the ResNets use it: no bias, He-normal kernel init over fan-out.

  Returns:
    `Conv` with `use_bias`, `kernel_init`, `dtype` and `cpu_kernels` fixed; call it
    with (features, kernel_size, strides=..., padding=..., name=...).
  """
  return functools.partial(
    Conv,
    use_bias=False,
    dtype=dtype,
    kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
    cpu_kernels=cpu_kernels,
  )


def max_pool_2x2(x: jax.Array, cpu_kernels: bool = True) -> jax.Array:
  """2x2 max-pool with stride 2 (VALID) over the H and W axes of `x` [B,H,W,C].

  `nn.max_pool(x, (2, 2), strides=(2, 2))` (a `reduce_window`, whose VJP is XLA's
  select-and-scatter); with `cpu_kernels`, lowered for CPU, `max_pool_2x2_cpu`.
  """
  plain = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
  if not cpu_kernels:
    return plain(x)
  return jax.lax.platform_dependent(x, cpu=max_pool_2x2_cpu, default=plain)


@jax.custom_vjp
def max_pool_2x2_cpu(x: jax.Array) -> jax.Array:
  """`max_pool_2x2`'s XLA:CPU form: the same values; a VJP of compares and selects.

  The VJP routes each window's cotangent to the window's first maximal element in
  row-major order (as PyTorch does).
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


max_pool_2x2_cpu.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def normalize(x: jax.Array, mean: Sequence[float] | None, std: Sequence[float] | None) -> jax.Array:
  """(x - mean) / std per channel in float32; identity when both are None."""
  x = x.astype(jnp.float32)
  if mean is None and std is None:
    return x
  mean = jnp.asarray(0.0 if mean is None else np.asarray(mean), jnp.float32)
  std = jnp.asarray(1.0 if std is None else np.asarray(std), jnp.float32)
  return (x - mean) / std
