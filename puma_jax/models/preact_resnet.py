"""PreAct ResNet-18 for 32x32 inputs (He et al. 2016), the variant of TRADES and most AT code.

Block: `o = relu(bn1(x)); sc = conv1x1(o) if the shape changes else x;
o = conv2(relu(bn2(conv1(o)))); return o + sc`. Every 3x3 conv pads (1, 1) on
both sides, the stride-2 ones too, as PyTorch does (Flax's 'SAME' would pad
(0, 1) there and shift the sampling grid). Submodules carry the PyTorch names
(`conv1`, `layer2_0.bn1`, `layer2_0.shortcut`, `bn`, `linear`), so a PyTorch
`state_dict` converts with `convert_torch_state_dict`.

BatchNorm: eval mode uses the running statistics; train mode (`train=True`,
`mutable=['batch_stats']`) normalises with the batch statistics and updates the
running ones with momentum 0.9 (PyTorch's 0.1). Flax keeps the biased batch
variance where PyTorch stores the unbiased one, a relative difference of 1/(n-1).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from puma_jax.models import layers, torch_layout

_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (planes at width 64, stride) per stage.
_BLOCKS_PER_STAGE = 2
_BN_EPS = 1e-5


class PreActBlock(nn.Module):
  """Pre-activation basic block; `x` f32[B,H,W,C] -> [B,H/stride,W/stride,planes]."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  cpu_kernels: bool = True
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=_BN_EPS,
      dtype=self.dtype,
      name=name,
    )
    conv = lambda features, k, stride, pad, name: layers.resnet_conv(self.dtype, self.cpu_kernels)(
      features, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)), name=name
    )
    out = nn.relu(bn('bn1')(x))
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = conv(self.planes, 1, self.stride, 0, 'shortcut')(out)
    else:
      shortcut = x
    out = conv(self.planes, 3, self.stride, 1, 'conv1')(out)
    out = conv(self.planes, 3, 1, 1, 'conv2')(nn.relu(bn('bn2')(out)))
    return out + shortcut


class PreActResNet18(nn.Module):
  """PreAct ResNet-18: conv3-64, 4 stages of 2 pre-activation blocks, BN, ReLU, mean pool, linear.

  Attributes:
    num_classes: number of logits K.
    width: channels of the first stage (64 is ResNet-18; smaller for quick tests).
    mean, std: optional per-channel input normalisation applied inside the model.
    dtype: compute dtype; parameters stay float32 and logits are float32.
    cpu_kernels: lowered for CPU, convs with XLA:CPU-fast gradients (`layers`);
      False: plain XLA convs everywhere (forward-mode autodiff works).
    bn_momentum: BatchNorm running-average decay (PyTorch momentum = 1 - this).
  """

  num_classes: int = 10
  width: int = 64
  mean: Sequence[float] | None = None
  std: Sequence[float] | None = None
  dtype: Any = jnp.float32
  cpu_kernels: bool = True
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits f32[B,K] of images `x` f32[B,H,W,C] in [0,1]."""
    x = layers.normalize(x, self.mean, self.std).astype(self.dtype)
    x = layers.resnet_conv(self.dtype, self.cpu_kernels)(
      self.width, (3, 3), padding=((1, 1), (1, 1)), name='conv1'
    )(x)
    for i, (planes, stride) in enumerate(_STAGES):
      for j in range(_BLOCKS_PER_STAGE):
        x = PreActBlock(
          planes * self.width // 64,
          stride if j == 0 else 1,
          dtype=self.dtype,
          cpu_kernels=self.cpu_kernels,
          bn_momentum=self.bn_momentum,
          name=f'layer{i + 1}_{j}',
        )(x, train)
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=_BN_EPS,
      dtype=self.dtype,
      name='bn',
    )(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='linear')(x)
    return x.astype(jnp.float32)


def convert_torch_state_dict(
  state_dict: Mapping[str, np.ndarray], **model_kwargs: Any
) -> dict[str, Any]:
  """Flax variables (`params`, `batch_stats`) of `PreActResNet18` from a PyTorch `state_dict`.

  Keys follow the PyTorch PreActResNet18 of TRADES / the peer benchmark:
  `conv1.weight`, `layer{1-4}.{0,1}.{bn1,conv1,bn2,conv2}.*`,
  `layer{2-4}.0.shortcut.0.weight`, `bn.*`, `linear.*`. Conv weights are OIHW
  (-> HWIO), Linear weights (out, in) (-> kernel W.T), BatchNorm weight/bias ->
  scale/bias and running_mean/running_var -> batch_stats mean/var;
  `num_batches_tracked` is ignored. `model_kwargs` are PreActResNet18 fields (only
  `width` and `num_classes` are checked against the shapes).

  Raises:
    ValueError: naming the key when a tensor is missing, unexpected, or misshaped.
  """
  width = model_kwargs.get('width', PreActResNet18.width)
  num_classes = model_kwargs.get('num_classes')
  sd = {
    k: np.asarray(v, np.float32)
    for k, v in state_dict.items()
    if not k.endswith('.num_batches_tracked')
  }
  used: set[str] = set()

  def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in sd:
      raise ValueError(f'PyTorch state_dict lacks {key!r} (PreActResNet18 layout)')
    if shape and sd[key].shape != shape:
      raise ValueError(
        f'PyTorch tensor {key!r} has shape {sd[key].shape}, expected {shape} (model.width={width})'
      )
    used.add(key)
    return sd[key]

  def conv(key: str, c_out: int, c_in: int, k: int) -> dict[str, np.ndarray]:
    return {'kernel': take(f'{key}.weight', (c_out, c_in, k, k)).transpose(2, 3, 1, 0)}

  def bn(key: str, c: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    p = {'scale': take(f'{key}.weight', (c,)), 'bias': take(f'{key}.bias', (c,))}
    s = {'mean': take(f'{key}.running_mean', (c,)), 'var': take(f'{key}.running_var', (c,))}
    return p, s

  params: dict[str, Any] = {'conv1': conv('conv1', width, 3, 3)}
  stats: dict[str, Any] = {}
  in_planes = width
  for i, (planes, stride) in enumerate(_STAGES):
    planes = planes * width // 64
    for j in range(_BLOCKS_PER_STAGE):
      t, f = f'layer{i + 1}.{j}', f'layer{i + 1}_{j}'
      p, s = {}, {}
      p['bn1'], s['bn1'] = bn(f'{t}.bn1', in_planes)
      p['conv1'] = conv(f'{t}.conv1', planes, in_planes, 3)
      p['bn2'], s['bn2'] = bn(f'{t}.bn2', planes)
      p['conv2'] = conv(f'{t}.conv2', planes, planes, 3)
      if (stride if j == 0 else 1) != 1 or in_planes != planes:
        p['shortcut'] = conv(f'{t}.shortcut.0', planes, in_planes, 1)
      params[f], stats[f] = p, s
      in_planes = planes
  params['bn'], stats['bn'] = bn('bn', in_planes)
  w = take('linear.weight', ())
  if w.shape[1] != in_planes or (num_classes is not None and w.shape[0] != num_classes):
    raise ValueError(
      f"PyTorch tensor 'linear.weight' has shape {w.shape}, expected "
      f'({num_classes or "K"}, {in_planes})'
    )
  params['linear'] = {'kernel': w.T, 'bias': take('linear.bias', (w.shape[0],))}
  unexpected = sorted(set(sd) - used)
  if unexpected:
    raise ValueError(f'PyTorch state_dict has tensors PreActResNet18 does not use: {unexpected}')
  return {'params': params, 'batch_stats': stats}


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The PyTorch state_dict of the PreActResNet18; the inverse of `convert_torch_state_dict`.

  Keys follow the TRADES PreActResNet18 (`conv1`, `layer{1-4}.{0,1}.{bn1,conv1,bn2,conv2}`,
  `layer{2-4}.0.shortcut.0`, `bn`, `linear`): conv kernels [h,w,I,O] -> weight
  [O,I,h,w], BatchNorm scale/bias/mean/var -> weight/bias/running_mean/running_var
  (plus `num_batches_tracked` = 0, int64), the linear kernel [I,K] -> weight [K,I].

  Args:
    variables: {'params': ..., 'batch_stats': ...} of a `PreActResNet18`.

  Returns:
    name -> array (float32; int64 for num_batches_tracked), in PyTorch's key order.
  """
  params, stats = variables['params'], variables['batch_stats']
  sd: dict[str, np.ndarray] = {}

  torch_layout.put_conv(sd, 'conv1', params['conv1'])
  for i in range(len(_STAGES)):
    for j in range(_BLOCKS_PER_STAGE):
      t, f = f'layer{i + 1}.{j}', f'layer{i + 1}_{j}'
      torch_layout.put_preact_block(
        sd, t, params[f], stats[f], layers=('bn1', 'conv1', 'bn2', 'conv2'), shortcut='shortcut.0'
      )
  torch_layout.put_batchnorm(sd, 'bn', params['bn'], stats['bn'])
  torch_layout.put_linear(sd, 'linear', params['linear'])
  return sd
