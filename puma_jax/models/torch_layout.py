"""Flax parameters of the common layers in PyTorch's state_dict layout (export direction).

Each helper writes one layer's tensors into a PyTorch state_dict `sd` under `key`:
conv kernels [h,w,I,O] -> `key.weight` [O,I,h,w]; BatchNorm scale/bias ->
weight/bias and mean/var -> running_mean/running_var plus a `num_batches_tracked`
of 0 (int64); a dense kernel [I,K] -> `key.weight` [K,I] and its bias. All float
tensors are float32. The models' `to_torch_state_dict` call them in PyTorch's key order.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np


def put_conv(sd: dict[str, np.ndarray], key: str, p: Mapping[str, Any]) -> None:
  """`key.weight` f32[O,I,h,w] from a conv's params {'kernel': [h,w,I,O]}."""
  sd[f'{key}.weight'] = np.asarray(p['kernel'], np.float32).transpose(3, 2, 0, 1)


def put_batchnorm(
  sd: dict[str, np.ndarray], key: str, p: Mapping[str, Any], s: Mapping[str, Any]
) -> None:
  """`key.{weight,bias,running_mean,running_var,num_batches_tracked}` of a BatchNorm.

  Args:
    sd: the state_dict being written.
    key: the layer's PyTorch name.
    p: {'scale': [C], 'bias': [C]}, the layer's params.
    s: {'mean': [C], 'var': [C]}, the layer's batch_stats.
  """
  sd[f'{key}.weight'] = np.asarray(p['scale'], np.float32)
  sd[f'{key}.bias'] = np.asarray(p['bias'], np.float32)
  sd[f'{key}.running_mean'] = np.asarray(s['mean'], np.float32)
  sd[f'{key}.running_var'] = np.asarray(s['var'], np.float32)
  sd[f'{key}.num_batches_tracked'] = np.zeros((), np.int64)


def put_linear(sd: dict[str, np.ndarray], key: str, p: Mapping[str, Any]) -> None:
  """`key.weight` f32[K,I] and `key.bias` f32[K] from {'kernel': [I,K], 'bias': [K]}."""
  sd[f'{key}.weight'] = np.asarray(p['kernel'], np.float32).T
  sd[f'{key}.bias'] = np.asarray(p['bias'], np.float32)


def put_preact_block(
  sd: dict[str, np.ndarray],
  prefix: str,
  p: Mapping[str, Any],
  s: Mapping[str, Any],
  *,
  layers: tuple[str, str, str, str],
  shortcut: str,
) -> None:
  """One pre-activation residual block in PyTorch's order: BN, conv, BN, conv, shortcut conv.

  Args:
    sd: the state_dict being written.
    prefix: the block's PyTorch name.
    p: the block's params; s: its batch_stats.
    layers: the names of its (BN, conv, BN, conv) layers, the same in Flax and PyTorch.
    shortcut: the PyTorch name of the 1x1 shortcut conv (Flax's 'shortcut'), written only
      when the block has one.
  """
  bn_a, conv_a, bn_b, conv_b = layers
  put_batchnorm(sd, f'{prefix}.{bn_a}', p[bn_a], s[bn_a])
  put_conv(sd, f'{prefix}.{conv_a}', p[conv_a])
  put_batchnorm(sd, f'{prefix}.{bn_b}', p[bn_b], s[bn_b])
  put_conv(sd, f'{prefix}.{conv_b}', p[conv_b])
  if 'shortcut' in p:
    put_conv(sd, f'{prefix}.{shortcut}', p['shortcut'])
