"""WideResNet with pre-activation blocks, as used for the generated-data robustness records.

The layout follows DeepMind's adversarial_robustness WideResNet (Gowal et al.
2020/2021) in the PyTorch form released with DM-Improves-AT (Wang et al. 2023,
`core/models/wideresnetwithswish.py`), so that its checkpoints load here through
`convert_torch_state_dict`:

- input normalisation `(x - mean) / std` inside the model (CIFAR-10 statistics
  by default);
- a 3x3 stem with 16 channels, then three groups of `(depth - 4) / 6` blocks
  with `16 * width`, `32 * width` and `64 * width` channels (strides 1, 2, 2);
- pre-activation blocks: BN -> activation -> conv3x3 -> BN -> activation ->
  conv3x3, plus a shortcut that is the identity, or, when the channel count or
  the stride changes, a 1x1 convolution of the *activated* input;
- a final BN -> activation -> global average pool -> linear layer.

Stride-2 convolutions pad by (0, 1) rows and columns, exactly as the PyTorch code
pads by hand to reproduce TensorFlow's 'SAME'. BatchNorm keeps running averages
with momentum 0.99 (PyTorch `momentum=0.01`, Haiku `decay_rate=0.99`) and
epsilon 1e-5, as in both codebases. The convolutions are `layers.Conv`: nn.Conv's
parameters, with gradients that stay on XLA:CPU's fast conv path (see `layers`).

WRN-28-10 and WRN-70-16 with `activation='swish'` are the architectures of the
generated-data records (Wang et al. 2023).
"""

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from puma_jax.models import layers, torch_layout

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# PyTorch's nn.GELU is the exact (erf) form; keep imported checkpoints exact.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  'relu': nn.relu,
  'swish': nn.swish,
  'silu': nn.silu,
  'gelu': functools.partial(nn.gelu, approximate=False),
  'elu': nn.elu,
  'leaky_relu': nn.leaky_relu,
  'softplus': nn.softplus,
}

# PyTorch (DM-Improves-AT) initialisation: convolutions N(0, 2 / (k * k * out_channels)),
# the linear layer U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with a zero bias.
_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class _Block(nn.Module):
  """One pre-activation block; maps f[B,H,W,C_in] to f[B,H/stride,W/stride,out_channels]."""

  out_channels: int
  stride: int
  activation: Callable[[jax.Array], jax.Array]
  bn_momentum: float
  bn_epsilon: float
  dtype: Any
  cpu_kernels: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
    )
    conv = layers.resnet_conv(self.dtype, self.cpu_kernels)
    if self.stride == 1:
      pad = ((1, 1), (1, 1))
    elif self.stride == 2:
      pad = ((0, 1), (0, 1))
    else:
      raise ValueError(f'unsupported stride {self.stride}')
    has_shortcut = x.shape[-1] != self.out_channels or self.stride != 1

    y = self.activation(norm(name='batchnorm_0')(x))
    if has_shortcut:
      # A projecting block feeds the activated input to its shortcut (pre-activation ResNet).
      shortcut = conv(
        self.out_channels,
        (1, 1),
        strides=(self.stride, self.stride),
        padding=((0, 0), (0, 0)),
        name='shortcut',
      )(y)
    else:
      shortcut = x
    y = conv(
      self.out_channels, (3, 3), strides=(self.stride, self.stride), padding=pad, name='conv_0'
    )(y)
    y = self.activation(norm(name='batchnorm_1')(y))
    y = conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name='conv_1')(y)
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-`depth`-`width` with pre-activation blocks and input normalisation inside.

  Attributes:
    num_classes: K, the number of logits.
    depth: 6n + 4 (28 for WRN-28-10, 70 for WRN-70-16).
    width: widening factor (10 for WRN-28-10, 16 for WRN-70-16).
    activation: a name in `ACTIVATIONS` ('swish' for the generated-data records).
    mean: per-channel mean subtracted from inputs in [0, 1].
    std: per-channel standard deviation dividing them.
    bn_momentum: BatchNorm running-average decay (PyTorch momentum = 1 - this).
    bn_epsilon: BatchNorm epsilon.
    dtype: compute dtype (float32 or bfloat16); parameters and logits stay float32.
    cpu_kernels: lowered for CPU, convs with XLA:CPU-fast gradients (`layers`);
      False: plain XLA convs everywhere (forward-mode autodiff works).
  """

  num_classes: int = 10
  depth: int = 28
  width: int = 10
  activation: str = 'swish'
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  cpu_kernels: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of a batch of images.

    Args:
      x: f32[B,H,W,C] images in [0, 1] (C = len(mean)).
      train: use batch statistics in BatchNorm (pass `mutable=['batch_stats']` to
        `apply`) instead of the running averages.

    Returns:
      f32[B,num_classes] logits, float32 whatever the compute dtype.
    """
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(
        f'WideResNet depth {self.depth} is not 6n + 4 with n >= 1 (config field '
        'model.depth); use e.g. 28 or 70.'
      )
    if self.width < 1:
      raise ValueError(f'WideResNet width {self.width} must be >= 1 (config field model.width)')
    if self.activation not in ACTIVATIONS:
      raise ValueError(
        f'unknown activation {self.activation!r} (config field model.activation); '
        f'known: {sorted(ACTIVATIONS)}'
      )
    if len(self.mean) != x.shape[-1] or len(self.std) != x.shape[-1]:
      raise ValueError(
        f'model.mean and model.std have {len(self.mean)} and {len(self.std)} entries but the '
        f'images have {x.shape[-1]} channels; give one value per channel.'
      )
    act = ACTIVATIONS[self.activation]
    blocks_per_group = (self.depth - 4) // 6

    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    y = ((x.astype(jnp.float32) - mean) / std).astype(self.dtype)
    y = layers.resnet_conv(self.dtype, self.cpu_kernels)(
      16, (3, 3), padding=((1, 1), (1, 1)), name='init_conv'
    )(y)
    for group, channels in enumerate((16 * self.width, 32 * self.width, 64 * self.width)):
      for i in range(blocks_per_group):
        y = _Block(
          out_channels=channels,
          stride=2 if group > 0 and i == 0 else 1,
          activation=act,
          bn_momentum=self.bn_momentum,
          bn_epsilon=self.bn_epsilon,
          dtype=self.dtype,
          cpu_kernels=self.cpu_kernels,
          name=f'layer_{group}_block_{i}',
        )(y, train)
    y = nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      name='batchnorm',
    )(y)
    y = act(y)
    # Global average pool in float32 (equal to PyTorch's avg_pool2d(8) on 32x32 inputs).
    y = jnp.mean(y.astype(jnp.float32), axis=(1, 2))
    y = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      kernel_init=_linear_init,
      bias_init=nn.initializers.zeros,
      name='logits',
    )(y)
    return y.astype(jnp.float32)


_BLOCK_KEY = re.compile(r'^layer\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$')
_BN_PARAMS = {'weight': 'scale', 'bias': 'bias'}
_BN_STATS = {'running_mean': 'mean', 'running_var': 'var'}


def convert_torch_state_dict(
  state_dict: Mapping[str, np.ndarray], **model_kwargs: Any
) -> dict[str, Any]:
  """Flax variables of a `WideResNet` from a DM-Improves-AT WRN(-Swish) PyTorch state_dict.

  The state_dict (name -> array, e.g. loaded from an .npz) has the layout of
  `core/models/wideresnetwithswish.py` in DM-Improves-AT (and of DeepMind's
  PyTorch model zoo): `init_conv.weight`, `layer.{g}.block.{i}.{batchnorm_0,
  conv_0,batchnorm_1,conv_1,shortcut}.*`, `batchnorm.*`, `logits.{weight,bias}`.
  A `module.` prefix (from `nn.DataParallel`) is removed; `num_batches_tracked`
  entries are ignored. The normalisation mean/std are not part of a state_dict:
  pass the dataset's (e.g. `CIFAR100_MEAN`) to the model.

  Args:
    state_dict: PyTorch parameter names -> arrays (conv weights [O,I,kh,kw]).
    **model_kwargs: if given, the `WideResNet` fields (num_classes, depth, width,
      ...) the weights must fit; every array shape is checked against that model.

  Returns:
    {'params': ..., 'batch_stats': ...} for `WideResNet.apply`, float32 arrays.
  """
  sd = {}
  for key, value in state_dict.items():
    while key.startswith('module.'):
      key = key[len('module.') :]
    sd[key] = np.asarray(value)
  sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  used: set[str] = set()

  def take(key: str) -> np.ndarray:
    if key not in sd:
      raise ValueError(
        f'WideResNet state_dict has no {key!r}; is this a DM-Improves-AT WRN checkpoint?'
      )
    used.add(key)
    return sd[key].astype(np.float32)

  def conv(key: str) -> dict[str, np.ndarray]:
    return {'kernel': take(f'{key}.weight').transpose(2, 3, 1, 0)}  # [O,I,h,w] -> [h,w,I,O]

  def batchnorm(key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    params = {name: take(f'{key}.{t}') for t, name in _BN_PARAMS.items()}
    stats = {name: take(f'{key}.{t}') for t, name in _BN_STATS.items()}
    return params, stats

  params: dict[str, Any] = {'init_conv': conv('init_conv')}
  stats: dict[str, Any] = {}
  blocks = sorted({(int(m[1]), int(m[2])) for k in sd if (m := _BLOCK_KEY.match(k))})
  for group, i in blocks:
    prefix, name = f'layer.{group}.block.{i}', f'layer_{group}_block_{i}'
    block_params, block_stats = {}, {}
    for bn in ('batchnorm_0', 'batchnorm_1'):
      block_params[bn], block_stats[bn] = batchnorm(f'{prefix}.{bn}')
    for c in ('conv_0', 'conv_1'):
      block_params[c] = conv(f'{prefix}.{c}')
    if f'{prefix}.shortcut.weight' in sd:
      block_params['shortcut'] = conv(f'{prefix}.shortcut')
    params[name], stats[name] = block_params, block_stats
  params['batchnorm'], stats['batchnorm'] = batchnorm('batchnorm')
  params['logits'] = {'kernel': take('logits.weight').T, 'bias': take('logits.bias')}

  unused = sorted(set(sd) - used)
  if unused:
    raise ValueError(
      f'WideResNet state_dict has {len(unused)} entries this model does not use, '
      f'e.g. {unused[:5]}; is this a DM-Improves-AT WRN checkpoint?'
    )
  variables = {'params': params, 'batch_stats': stats}
  if model_kwargs:
    _check_shapes(variables, in_channels=params['init_conv']['kernel'].shape[2], **model_kwargs)
  return variables


def _check_shapes(variables: dict[str, Any], *, in_channels: int, **model_kwargs: Any) -> None:
  """Raises if `variables` do not have exactly the shapes of `WideResNet(**model_kwargs)`."""
  model_kwargs.pop('dtype', None)
  model = WideResNet(**model_kwargs)
  x = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
  expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(variables)}
  problems = [f'missing {k} {s}' for k, s in want.items() if k not in got]
  problems += [f'unexpected {k} {s}' for k, s in got.items() if k not in want]
  problems += [
    f'{k}: checkpoint {got[k]} vs model {s}' for k, s in want.items() if k in got and got[k] != s
  ]
  if problems:
    fields = ', '.join(f'{k}={v!r}' for k, v in sorted(model_kwargs.items()))
    raise ValueError(
      f'the PyTorch weights do not fit WideResNet({fields}) ({len(problems)} problems, e.g. '
      f'{problems[:3]}); set model.depth / model.width / model.num_classes to the checkpoint.'
    )


_FLAX_BLOCK = re.compile(r'^layer_(\d+)_block_(\d+)$')


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The PyTorch state_dict of DM-Improves-AT's WideResNet; the inverse of the converter.

  Keys and shapes are those of `core/models/wideresnetwithswish.py` (RobustBench's
  `DMWideResNet`): conv kernels [h,w,I,O] -> weight [O,I,h,w]; BatchNorm scale/bias
  -> weight/bias, mean/var -> running_mean/running_var, plus a `num_batches_tracked`
  of 0 (int64; unused with PyTorch's momentum); the linear kernel [I,K] -> weight [K,I].
  `convert_torch_state_dict` of the result gives back `variables` exactly.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of a `WideResNet`.

  Returns:
    name -> array (float32, int64 for num_batches_tracked), in PyTorch's key order.
  """
  params, stats = variables['params'], variables['batch_stats']
  sd: dict[str, np.ndarray] = {}

  torch_layout.put_conv(sd, 'init_conv', params['init_conv'])
  blocks = sorted((int(m[1]), int(m[2])) for k in params if (m := _FLAX_BLOCK.match(k)))
  for group, i in blocks:
    name = f'layer_{group}_block_{i}'
    torch_layout.put_preact_block(
      sd,
      f'layer.{group}.block.{i}',
      params[name],
      stats[name],
      layers=('batchnorm_0', 'conv_0', 'batchnorm_1', 'conv_1'),
      shortcut='shortcut',
    )
  torch_layout.put_batchnorm(sd, 'batchnorm', params['batchnorm'], stats['batchnorm'])
  torch_layout.put_linear(sd, 'logits', params['logits'])
  return sd
