"""puma_jax models and inputs for the PyTorch peers: model.json, model.npz (a state_dict), inputs.

Runs with puma_jax (JAX, no torch). A model goes to PyTorch as two files in a folder:

* `model.json`: {'name': 'small_cnn' | 'preact_resnet18', 'kwargs': the model's fields,
  'image_shape': [H, W, C], 'num_classes': K}, from which experiments/peers/torch_models.py
  builds the same network;
* `model.npz`: its variables as a PyTorch `state_dict` (the inverse of
  `puma_jax.models.<model>.convert_torch_state_dict`): conv kernels HWIO -> OIHW, dense
  kernels (in, out) -> (out, in), BatchNorm scale/bias/mean/var -> weight/bias/
  running_mean/running_var, and SmallCNN's `fc1` rows reordered from this model's HWC
  flatten to PyTorch's CHW flatten.

`write_bench_artifacts` writes the fixed inputs and random-init weights that
experiments/bench_attacks.py times both sides on; as a script:

  python -m experiments.peers.export --out DIR [--models small_cnn,preact_resnet18] [--n 256]
"""

import argparse
import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from puma_jax import artifacts, models
from puma_jax.models import preact_resnet, small_cnn

# The model fields that the PyTorch twins take, per registered name.
FIELDS = {
  'small_cnn': ('conv_channels', 'pool_after', 'dense_widths', 'kernel_size', 'mean', 'std'),
  'preact_resnet18': ('width', 'mean', 'std'),
}
CLASSES = {'small_cnn': small_cnn.SmallCNN, 'preact_resnet18': preact_resnet.PreActResNet18}
# experiments/bench_attacks.py's models: the peer benchmark's CIFAR CNN and ResNet-18.
BENCH_MODELS = {
  'small_cnn': dict(
    conv_channels=(32, 64, 128), pool_after=(False, True, True), dense_widths=(256,)
  ),
  'preact_resnet18': {},
}


def _jsonable(value: Any) -> Any:
  if isinstance(value, tuple | list):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def architecture(model: Any, image_shape: Sequence[int]) -> dict[str, Any]:
  """model.json's contents for a SmallCNN or PreActResNet18 module (JSON-serialisable)."""
  name = next((n for n, cls in CLASSES.items() if isinstance(model, cls)), None)
  if name is None:
    raise ValueError(
      f'the PyTorch peers mirror {sorted(CLASSES)} (model.name), not {type(model).__name__}; '
      'export a WideResNet with `python -m puma_jax.export` instead'
    )
  if jnp.dtype(model.dtype) != jnp.float32:
    raise ValueError(f'the PyTorch peers compute in float32; the model has dtype {model.dtype}')
  return {
    'name': name,
    'kwargs': {f: _jsonable(getattr(model, f)) for f in FIELDS[name]},
    'image_shape': [int(d) for d in image_shape],
    'num_classes': int(model.num_classes),
  }


def _np(a: Any) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a, np.float32))


def _small_cnn_state_dict(variables: Any, arch: dict[str, Any]) -> dict[str, np.ndarray]:
  params, kw = variables['params'], arch['kwargs']
  h, w, channels = arch['image_shape']
  for pool in kw['pool_after']:
    h, w = (h // 2, w // 2) if pool else (h, w)
  sd = {}
  for i, c in enumerate(kw['conv_channels']):
    p = params[f'conv{i + 1}']
    sd[f'conv{i + 1}.weight'] = _np(p['kernel']).transpose(3, 2, 0, 1)
    sd[f'conv{i + 1}.bias'] = _np(p['bias'])
    channels = c
  for j in range(len(kw['dense_widths']) + 1):
    p = params[f'fc{j + 1}']
    kernel = _np(p['kernel'])
    if j == 0:
      if kernel.shape[0] != h * w * channels:
        raise ValueError(f'fc1 has {kernel.shape[0]} inputs; the conv map is {h}x{w}x{channels}')
      kernel = (
        kernel.reshape(h, w, channels, -1).transpose(2, 0, 1, 3).reshape(h * w * channels, -1)
      )
    sd[f'fc{j + 1}.weight'] = kernel.T
    sd[f'fc{j + 1}.bias'] = _np(p['bias'])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def _preact_state_dict(variables: Any, arch: dict[str, Any]) -> dict[str, np.ndarray]:
  params, stats = variables['params'], variables['batch_stats']
  sd = {}

  def put(torch_name: str, flax_params: Any, flax_stats: Any = None) -> None:
    if 'kernel' in flax_params and flax_stats is None:
      kernel = _np(flax_params['kernel'])
      sd[f'{torch_name}.weight'] = kernel.T if kernel.ndim == 2 else kernel.transpose(3, 2, 0, 1)
      if 'bias' in flax_params:
        sd[f'{torch_name}.bias'] = _np(flax_params['bias'])
    else:  # BatchNorm
      sd[f'{torch_name}.weight'] = _np(flax_params['scale'])
      sd[f'{torch_name}.bias'] = _np(flax_params['bias'])
      sd[f'{torch_name}.running_mean'] = _np(flax_stats['mean'])
      sd[f'{torch_name}.running_var'] = _np(flax_stats['var'])

  put('conv1', params['conv1'])
  for block in sorted(k for k in params if k.startswith('layer')):
    prefix = block.replace('_', '.')  # layer2_0 -> layer2.0
    for bn in ('bn1', 'bn2'):
      put(f'{prefix}.{bn}', params[block][bn], stats[block][bn])
    for conv in ('conv1', 'conv2'):
      put(f'{prefix}.{conv}', params[block][conv])
    if 'shortcut' in params[block]:
      put(f'{prefix}.shortcut.0', params[block]['shortcut'])
  put('bn', params['bn'], stats['bn'])
  put('linear', params['linear'])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def to_torch_state_dict(variables: Any, arch: dict[str, Any]) -> dict[str, np.ndarray]:
  """A PyTorch state_dict (name -> f32 array) of the Flax `variables` of model `arch`."""
  convert = {'small_cnn': _small_cnn_state_dict, 'preact_resnet18': _preact_state_dict}
  return convert[arch['name']](variables, arch)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
  """np.savez through a temporary file and a rename."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  artifacts.write_bytes(Path(path), buf.getvalue())


def write_model(directory: Path, model: Any, variables: Any, image_shape: Sequence[int]) -> dict:
  """Writes `directory`/model.json and model.npz; returns the architecture."""
  directory = Path(directory)
  arch = architecture(model, image_shape)
  save_npz(directory / 'model.npz', **to_torch_state_dict(variables, arch))
  artifacts.write_json(directory / 'model.json', arch)
  return arch


def random_variables(model: Any, x: np.ndarray, seed: int) -> Any:
  """Random-init variables; BatchNorm running statistics set to those of the batch `x`.

  Flax updates running = 0.9 running + 0.1 batch; from running = 0 one train-mode pass
  leaves 0.1 x the batch statistics (biased variance, every layer in train mode, as
  PyTorch's calibration pass with momentum=None would normalise them).
  """
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x[:1])
  if 'batch_stats' not in variables:
    return variables
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  calibrate = jax.jit(
    lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[1]['batch_stats']
  )
  stats = calibrate({'params': variables['params'], 'batch_stats': zeros}, x)
  return {'params': variables['params'], 'batch_stats': jax.tree.map(lambda s: s / 0.1, stats)}


def write_bench_artifacts(
  out: Path, names: Sequence[str] = tuple(BENCH_MODELS), n: int = 256, seed: int = 0
) -> None:
  """experiments/bench_attacks.py's inputs and models, in `out`.

  `out`/inputs.npz: x_nchw f32[n,3,32,32] uniform in [0, 1] (NumPy seed `seed`), x_nhwc
  (the same, NHWC), train_labels i64[n] (uniform classes, seed + 1). Per model,
  `out`/<name>/: model.json, model.npz (random init with key `seed`) and reference.npz:
  logits (the JAX eval-mode logits f32[n,10] of x) and labels (their argmax, i64[n]: the
  labels DeepFool attacks).
  """
  out = Path(out)
  rs = np.random.default_rng(seed)
  x = rs.uniform(size=(n, 32, 32, 3)).astype(np.float32)
  labels = np.random.default_rng(seed + 1).integers(0, 10, n).astype(np.int64)
  save_npz(
    out / 'inputs.npz',
    x_nchw=np.ascontiguousarray(x.transpose(0, 3, 1, 2)),
    x_nhwc=x,
    train_labels=labels,
  )
  for name in names:
    if name not in BENCH_MODELS:
      raise ValueError(f'--models: unknown {name!r}; choose from {sorted(BENCH_MODELS)}')
    model = models.create(name, num_classes=10, **BENCH_MODELS[name])
    variables = random_variables(model, x, seed)
    write_model(out / name, model, variables, x.shape[1:])
    logits = np.asarray(jax.jit(lambda v, z, m=model: m.apply(v, z, train=False))(variables, x))
    save_npz(out / name / 'reference.npz', logits=logits, labels=logits.argmax(-1).astype(np.int64))


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', required=True, help='folder for inputs.npz and <model>/')
  ap.add_argument('--models', default=','.join(BENCH_MODELS))
  ap.add_argument('--n', type=int, default=256, help='number of inputs')
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args(argv)
  names = [m for m in args.models.split(',') if m]
  write_bench_artifacts(Path(args.out), names, args.n, args.seed)
  print(f'wrote inputs.npz and {", ".join(names)} to {args.out}')


if __name__ == '__main__':
  main()
