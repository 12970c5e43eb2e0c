"""A small configurable CNN: 3x3 conv + ReLU blocks with optional 2x2 max-pool, then dense layers.

Two configurations matter:

* the default, a fast MNIST model (28x28x1 input, about 2.4 MFLOP per forward pass):
  conv3-16, relu, maxpool2, conv3-32, relu, maxpool2, fc128, relu, fc10;
* the peer benchmark's CIFAR CNN (32x32x3 input, 81.5 MFLOP):
  `SmallCNN(conv_channels=(32, 64, 128), pool_after=(False, True, True), dense_widths=(256,))`,
  i.e. conv3-32, relu, conv3-64, relu, maxpool2, conv3-128, relu, maxpool2, fc256, relu, fc10.

Convs and pooling come from `layers` (input gradients that stay fast inside loops).
Submodules are named after the PyTorch layers they import from: `conv1`, `conv2`, ...
and `fc1`, `fc2`, ... (the last `fc` is the classifier), so a PyTorch `state_dict`
with those names converts with `convert_torch_state_dict`.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from puma_jax.models import layers


class SmallCNN(nn.Module):
  """Conv blocks (3x3 conv, ReLU, optional 2x2 max-pool), flatten, dense layers.

  Attributes:
    num_classes: number of logits K.
    conv_channels: output channels of each conv layer.
    pool_after: for each conv layer, whether a 2x2 max-pool follows its ReLU.
    dense_widths: widths of the hidden dense layers (each followed by ReLU); the
      classifier layer comes after them.
    kernel_size: conv kernel size (odd); padding keeps the spatial size.
    mean, std: optional per-channel input normalisation applied inside the model.
    dtype: compute dtype; parameters stay float32 and logits are float32.
    cpu_kernels: lowered for CPU, convs and pools with XLA:CPU-fast gradients
      (`layers`); False: plain XLA ops everywhere (forward-mode autodiff works).
  """

  num_classes: int = 10
  conv_channels: Sequence[int] = (16, 32)
  pool_after: Sequence[bool] = (True, True)
  dense_widths: Sequence[int] = (128,)
  kernel_size: int = 3
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  dtype: Any = jnp.float32
  cpu_kernels: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits f32[B,K] of images `x` f32[B,H,W,C] in [0,1] (`train` is unused: no BN/dropout)."""
    del train
    if len(self.pool_after) != len(self.conv_channels):
      raise ValueError(
        f'SmallCNN: pool_after has {len(self.pool_after)} entries but conv_channels has '
        f'{len(self.conv_channels)}; give one bool per conv layer (config model.pool_after).'
      )
    if self.kernel_size % 2 != 1:
      raise ValueError(f'SmallCNN: kernel_size must be odd, got {self.kernel_size}')
    x = layers.normalize(x, self.mean, self.std).astype(self.dtype)
    pad = self.kernel_size // 2
    for i, (features, pool) in enumerate(zip(self.conv_channels, self.pool_after, strict=True)):
      x = layers.Conv(
        features,
        (self.kernel_size, self.kernel_size),
        padding=((pad, pad), (pad, pad)),
        dtype=self.dtype,
        cpu_kernels=self.cpu_kernels,
        name=f'conv{i + 1}',
      )(x)
      x = nn.relu(x)
      if pool:
        x = layers.max_pool_2x2(x, self.cpu_kernels)
    x = x.reshape(x.shape[0], -1)  # HWC order; the PyTorch import permutes fc1 from CHW.
    for j, width in enumerate(self.dense_widths):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f'fc{j + 1}')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name=f'fc{len(self.dense_widths) + 1}')(x)
    return x.astype(jnp.float32)


def convert_torch_state_dict(
  state_dict: Mapping[str, np.ndarray], **model_kwargs: Any
) -> dict[str, Any]:
  """Flax variables of `SmallCNN(**model_kwargs)` from a PyTorch `state_dict` (name -> array).

  The PyTorch model must name its layers `conv1..convN` (nn.Conv2d, OIHW weights)
  and `fc1..fcM` (nn.Linear, (out, in) weights), and flatten the last conv block's
  NCHW map as PyTorch does (feature index c*H*W + h*W + w); the columns of `fc1`
  are permuted to the HWC order of this NHWC model. `model_kwargs` are the
  SmallCNN fields (only `conv_channels` and `dense_widths` matter here).

  Raises:
    ValueError: naming the key when a tensor is missing, unexpected, or has a shape
      that does not fit the configured architecture.
  """
  fields = {f: getattr(SmallCNN, f) for f in ('conv_channels', 'dense_widths')}
  fields.update({k: v for k, v in model_kwargs.items() if k in fields})
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  used: set[str] = set()

  def take(key: str, ndim: int) -> np.ndarray:
    if key not in sd:
      raise ValueError(f'PyTorch state_dict lacks {key!r} (SmallCNN expects conv1.., fc1.. layers)')
    if sd[key].ndim != ndim:
      raise ValueError(f'PyTorch tensor {key!r} has shape {sd[key].shape}, expected {ndim} dims')
    used.add(key)
    return sd[key]

  params: dict[str, Any] = {}
  in_ch = None
  for i, features in enumerate(fields['conv_channels']):
    name = f'conv{i + 1}'
    w, b = take(f'{name}.weight', 4), take(f'{name}.bias', 1)
    if w.shape[0] != features or (in_ch is not None and w.shape[1] != in_ch):
      raise ValueError(
        f'PyTorch tensor {name}.weight has shape {w.shape}; the model expects '
        f'{features} output channels{"" if in_ch is None else f" and {in_ch} inputs"} '
        '(check model.conv_channels)'
      )
    params[name] = {'kernel': w.transpose(2, 3, 1, 0), 'bias': b}
    in_ch = features
  widths = list(fields['dense_widths'])
  for j in range(len(widths) + 1):
    name = f'fc{j + 1}'
    w, b = take(f'{name}.weight', 2), take(f'{name}.bias', 1)
    if j < len(widths) and w.shape[0] != widths[j]:
      raise ValueError(
        f'PyTorch tensor {name}.weight has {w.shape[0]} outputs; model.dense_widths[{j}] '
        f'is {widths[j]}'
      )
    kernel = w.T
    if j == 0 and in_ch is not None:
      kernel = _chw_rows_to_hwc(kernel, in_ch, name)
    params[name] = {'kernel': kernel, 'bias': b}
  unexpected = sorted(set(sd) - used)
  if unexpected:
    raise ValueError(f'PyTorch state_dict has tensors SmallCNN does not use: {unexpected}')
  return {'params': params}


def _chw_rows_to_hwc(kernel: np.ndarray, channels: int, name: str) -> np.ndarray:
  """Reorders the input rows of a (C*H*W, out) kernel from CHW to HWC order (square maps)."""
  n_in = kernel.shape[0]
  hw = n_in // channels
  side = int(round(hw**0.5))
  if hw * channels != n_in or side * side != hw:
    raise ValueError(
      f'PyTorch tensor {name}.weight has {n_in} inputs, not channels ({channels}) x a square map'
    )
  return kernel.reshape(channels, side, side, -1).transpose(1, 2, 0, 3).reshape(n_in, -1)


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The PyTorch state_dict of the SmallCNN; the inverse of `convert_torch_state_dict`.

  `conv{i}.weight` [O,I,h,w] and `.bias`, `fc{j}.weight` [out,in] and `.bias`; the
  rows of `fc1` go back from this model's HWC flattening to PyTorch's CHW order
  (square maps), so the PyTorch model flattens its NCHW map with `x.flatten(1)`.

  Args:
    variables: {'params': ...} of a `SmallCNN`.

  Returns:
    name -> float32 array.
  """
  params = variables['params']
  sd: dict[str, np.ndarray] = {}
  num_convs = sum(1 for k in params if re.fullmatch(r'conv\d+', k))
  num_fcs = sum(1 for k in params if re.fullmatch(r'fc\d+', k))
  channels = None
  for i in range(1, num_convs + 1):
    kernel = np.asarray(params[f'conv{i}']['kernel'], np.float32)
    sd[f'conv{i}.weight'] = kernel.transpose(3, 2, 0, 1)
    sd[f'conv{i}.bias'] = np.asarray(params[f'conv{i}']['bias'], np.float32)
    channels = kernel.shape[-1]
  for j in range(1, num_fcs + 1):
    kernel = np.asarray(params[f'fc{j}']['kernel'], np.float32)
    if j == 1 and channels is not None:
      kernel = _hwc_rows_to_chw(kernel, channels, f'fc{j}')
    sd[f'fc{j}.weight'] = kernel.T
    sd[f'fc{j}.bias'] = np.asarray(params[f'fc{j}']['bias'], np.float32)
  return sd


def _hwc_rows_to_chw(kernel: np.ndarray, channels: int, name: str) -> np.ndarray:
  """Reorders the input rows of an (H*W*C, out) kernel from HWC to CHW order (square maps)."""
  n_in = kernel.shape[0]
  hw = n_in // channels
  side = int(round(hw**0.5))
  if hw * channels != n_in or side * side != hw:
    raise ValueError(f'{name} kernel has {n_in} inputs, not a square map of {channels} channels')
  return kernel.reshape(side, side, channels, -1).transpose(2, 0, 1, 3).reshape(n_in, -1)
