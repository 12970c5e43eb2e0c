"""Flax Linen models and a name -> class registry.

`create(name, num_classes=..., dtype=..., **kwargs)` builds a module whose
`apply(variables, x, train=...)` maps f32[B,H,W,C] images in [0,1] to float32
logits f32[B,K]; input normalisation happens inside the model.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from puma_jax.models import preact_resnet, small_cnn, wide_resnet

# name -> (module class, converter of a PyTorch state_dict to Flax variables).
REGISTRY: dict[str, tuple[type[nn.Module], Callable[..., dict[str, Any]] | None]] = {
  'small_cnn': (small_cnn.SmallCNN, small_cnn.convert_torch_state_dict),
  'preact_resnet18': (preact_resnet.PreActResNet18, preact_resnet.convert_torch_state_dict),
  'wrn': (wide_resnet.WideResNet, wide_resnet.convert_torch_state_dict),
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _lookup(name: str):
  if name not in REGISTRY:
    raise ValueError(f'unknown model {name!r} (config field model.name); known: {sorted(REGISTRY)}')
  return REGISTRY[name]


def create(name: str, *, num_classes: int, dtype: str = 'float32', **kwargs: Any) -> nn.Module:
  """Builds the registered model `name`; `dtype` is the compute dtype (params stay float32).

  Every model also takes `cpu_kernels` (config field `model.cpu_kernels`, default True):
  XLA:CPU-fast conv / max-pool gradients in programs lowered for CPU (`layers`); it
  changes no parameter. `kwargs` are the model's other fields.
  """
  cls, _ = _lookup(name)
  if dtype not in DTYPES:
    raise ValueError(f'unknown dtype {dtype!r} (config field model.dtype); known: {sorted(DTYPES)}')
  return cls(num_classes=num_classes, dtype=DTYPES[dtype], **kwargs)


def import_torch_npz(name: str, path: str, **model_kwargs: Any) -> dict[str, Any]:
  """Flax variables of model `name` from a PyTorch state_dict saved as .npz (name -> array)."""
  _, convert = _lookup(name)
  if convert is None:
    raise ValueError(f'model {name!r} has no PyTorch weight import')
  try:
    with np.load(path) as f:
      state_dict = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read PyTorch weights {path}: {e}') from e
  return convert(state_dict, **model_kwargs)
