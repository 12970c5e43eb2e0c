"""Flax Linen models and a name -> class registry.

`create(name, num_classes=..., dtype=..., **kwargs)` builds a module whose
`apply(variables, x, train=...)` maps f32[B,H,W,C] images in [0,1] to float32
logits f32[B,K]; input normalisation happens inside the model.

PyTorch: `import_torch_state_dict(name, path)` reads a state_dict saved as
.safetensors or .npz into Flax variables, and `export_torch_state_dict(name,
variables)` is its exact inverse (PyTorch names, NCHW/OIHW layouts), which
`python -m puma_jax.export` saves with safetensors (docs/export.md).
"""

import os
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from puma_jax.models import preact_resnet, small_cnn, wide_resnet

# name -> (module class, PyTorch state_dict -> Flax variables, Flax variables -> state_dict).
REGISTRY: dict[
  str,
  tuple[
    type[nn.Module],
    Callable[..., dict[str, Any]],
    Callable[[Mapping[str, Any]], dict[str, np.ndarray]],
  ],
] = {
  'small_cnn': (
    small_cnn.SmallCNN,
    small_cnn.convert_torch_state_dict,
    small_cnn.to_torch_state_dict,
  ),
  'preact_resnet18': (
    preact_resnet.PreActResNet18,
    preact_resnet.convert_torch_state_dict,
    preact_resnet.to_torch_state_dict,
  ),
  'wrn': (
    wide_resnet.WideResNet,
    wide_resnet.convert_torch_state_dict,
    wide_resnet.to_torch_state_dict,
  ),
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
  cls = _lookup(name)[0]
  if dtype not in DTYPES:
    raise ValueError(f'unknown dtype {dtype!r} (config field model.dtype); known: {sorted(DTYPES)}')
  return cls(num_classes=num_classes, dtype=DTYPES[dtype], **kwargs)


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A PyTorch state_dict (name -> array) from a .safetensors or an .npz file.

  The format is read from the file itself (an .npz is a zip archive).

  Raises:
    ValueError: naming the file when it is neither.
  """
  try:
    if zipfile.is_zipfile(path):
      with np.load(path) as f:
        return {k: f[k] for k in f.files}
    return safetensors.numpy.load_file(os.fspath(path))
  except (OSError, ValueError, safetensors.SafetensorError) as e:
    raise ValueError(
      f'cannot read PyTorch weights {path}: {e}; give a state_dict saved with '
      'safetensors (safetensors.torch.save_file) or as .npz (np.savez(path, **state_dict)).'
    ) from e


def import_torch_state_dict(name: str, path: str | os.PathLike, **model_kwargs: Any) -> dict:
  """Flax variables of model `name` from a PyTorch state_dict file (.safetensors or .npz)."""
  convert = _lookup(name)[1]
  return convert(read_torch_state_dict(path), **model_kwargs)


def export_torch_state_dict(name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The PyTorch state_dict (name -> NumPy array, NCHW layouts) of model `name`'s variables.

  The inverse of the import: `import_torch_state_dict` of the saved result gives
  back `variables` exactly (float32). Arrays are C-contiguous, as
  `safetensors.numpy.save_file` needs (it writes a transposed view's memory as is).
  """
  return {k: np.asarray(v, order='C') for k, v in _lookup(name)[2](variables).items()}
