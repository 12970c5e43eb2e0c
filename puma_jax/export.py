r"""Exports a trained model's EMA weights as a PyTorch state_dict in safetensors format.

  python -m puma_jax.export --workdir=/tmp/puma_cifar --out=/tmp/puma_cifar/wrn.safetensors

Reads `<workdir>/config.json` and the latest checkpoint of `<workdir>/train`,
takes the EMA weights (the ones the evaluate stage attacks) and writes them with
`safetensors.numpy.save_file`, so no PyTorch is needed here. Names and NCHW
layouts are those of the PyTorch models the JAX ones mirror (see docs/export.md):

- model.name=wrn: DM-Improves-AT's `WideResNet` (`core/models/wideresnetwithswish.py`),
  RobustBench's `DMWideResNet`;
- model.name=preact_resnet18: the PreAct ResNet-18 of TRADES / most AT code;
- model.name=small_cnn: `conv1..`, `fc1..` with PyTorch's NCHW flattening.

The file's metadata records the model config (`puma_jax.model`, JSON), the
image shape and the training step. `models.import_torch_state_dict` reads the
file back into exactly the same Flax variables.
"""

import json
from pathlib import Path
from typing import Any

import safetensors.numpy
from absl import flags, logging

from puma_jax import artifacts, cli, model_io, models
from puma_jax.datasets import DataError, cifar, mnist

_IMAGE_SHAPES = {
  'mnist_embedded': mnist.IMAGE_SHAPE,
  'cifar10': cifar.IMAGE_SHAPE,
  'cifar100': cifar.IMAGE_SHAPE,
}


def load_config(workdir: str | Path) -> Any:
  """The config a pipeline workdir was made with (`artifacts.load_config`), warning of dropped fields.

  Raises:
    FileNotFoundError: no config.json (not a pipeline workdir).
  """
  config, ignored = artifacts.load_config(workdir)
  if ignored:
    logging.warning('%s: fields not in the current config schema, ignored: %s', workdir, ignored)
  return config


def image_shape(config: Any, workdir: str | Path) -> tuple[int, int, int]:
  """(H, W, C) of the run's images: fixed for the built-in datasets, else the prepared data."""
  kind = config.data.real.kind
  if kind in _IMAGE_SHAPES:
    return tuple(_IMAGE_SHAPES[kind])
  from puma_jax import datasets  # noqa: PLC0415 (only image folders need the prepared data)

  prepared = datasets.prepare(config.data, Path(workdir) / 'data', build=False)
  return tuple(prepared.real_train.image_shape)


def export(workdir: str | Path, out: str | Path, *, allow_unfinished: bool = False) -> Path:
  """Writes the EMA weights of `<workdir>/train` to `out` (.safetensors); returns `out`.

  Raises:
    FileNotFoundError: not a pipeline workdir, or no checkpoint.
    DataError: training has not finished (and not `allow_unfinished`).
  """
  workdir, out = Path(workdir).expanduser(), Path(out).expanduser()
  config = load_config(workdir)
  train_dir = workdir / 'train'
  if not (train_dir / 'stage.json').exists() and not allow_unfinished:
    raise DataError(
      f'{train_dir / "stage.json"} is missing: training has not finished in {workdir}. Finish '
      'it (rerun python -m puma_jax.main with the same --workdir), or pass --allow_unfinished '
      'to export its latest checkpoint.'
    )
  shape = image_shape(config, workdir)
  _, variables = model_io.restore_ema_variables(config.model, train_dir)
  state_dict = models.export_torch_state_dict(config.model.name, variables)
  metadata = {
    'format': 'pt',
    'puma_jax.model': json.dumps(config.model.to_dict(), sort_keys=True),
    'puma_jax.image_shape': json.dumps(list(shape)),
    'puma_jax.workdir': str(workdir.resolve()),
  }
  with artifacts.atomic_path(out) as tmp:
    safetensors.numpy.save_file(state_dict, str(tmp), metadata=metadata)
  n = sum(int(v.size) for v in state_dict.values())
  logging.info('wrote %s: %d tensors, %d numbers', out, len(state_dict), n)
  return out


def run() -> None:
  """The command line (flags are defined here, so importing this module defines none)."""
  workdir = flags.DEFINE_string('workdir', None, 'Workdir of a pipeline run (puma_jax.main).')
  out = flags.DEFINE_string('out', None, 'The .safetensors file to write.')
  allow_unfinished = flags.DEFINE_bool(
    'allow_unfinished', False, 'Export the latest checkpoint of a run that has not finished.'
  )
  flags.mark_flags_as_required(['workdir', 'out'])

  def main(argv: list[str]) -> None:
    del argv
    path = export(workdir.value, out.value, allow_unfinished=allow_unfinished.value)
    print(f'wrote {path} (a PyTorch state_dict in safetensors; docs/export.md loads it)')  # noqa: T201

  cli.run(main, prog='puma_jax.export')


if __name__ == '__main__':
  run()
