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
