"""Model I/O: the module a config names, its weights from a workdir or a PyTorch file, their fingerprint.

Below `train`, `margins`, `evaluate`, `export` and `pipeline`, which get their
models here:

- `create_model(config.model)`: the Flax module (`models.create` with the config's fields).
- `restore_ema_variables(config.model, workdir)`: the EMA weights of the latest
  good checkpoint of a training workdir (`<workdir>/checkpoints/`), the weights that
  training evaluates and the later stages use. The train state is restored as saved
  (`checkpointing.AsSaved`): its structure is read from the checkpoint, so nothing
  here depends on the optimiser or the schedule that trained it. Checksums are
  verified; a damaged checkpoint is skipped for the previous one (`checkpointing`).
- `load_torch_state_dict(config.model, path)`: the module with weights from a
  PyTorch state_dict (.safetensors or .npz).
- `model_fingerprint(variables)`: 'sha256:<hex>' over the variables' key paths,
  dtypes, shapes and bytes (`artifacts.tree_fingerprint`), the identity of a model's
  weights in the margin sidecars, the stage markers and the evaluation's settings.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from puma_jax import artifacts, checkpointing, models, parallel

# The fields of the train state (`steps.TrainState`) that hold the averaged weights.
EMA_PARAMS, EMA_BATCH_STATS = 'ema_params', 'ema_batch_stats'


def create_model(model_config: Mapping[str, Any]) -> nn.Module:
  """The Flax module named by `config.model` (every other field is a constructor argument)."""
  kwargs = dict(model_config)
  if 'name' not in kwargs:
    raise ValueError(f'a model config needs a `name` (config.model), got fields {sorted(kwargs)}')
  return models.create(kwargs.pop('name'), **kwargs)


def load_torch_state_dict(
  model_config: Mapping[str, Any], path: str | os.PathLike
) -> tuple[nn.Module, dict[str, Any]]:
  """The module that `model_config` (config.model) describes, with weights from a PyTorch file.

  Args:
    model_config: `name`, `dtype` and the constructor arguments (e.g. `num_classes`).
    path: a PyTorch state_dict saved as .safetensors or .npz (name -> array).

  Returns:
    (module, Flax variables).
  """
  model = create_model(model_config)
  kwargs = dict(model_config)
  name = kwargs.pop('name')
  kwargs.pop('dtype', None)
  return model, models.import_torch_state_dict(name, path, **kwargs)


def restore_ema_variables(
  model_config: Mapping[str, Any],
  workdir: str | Path,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
  """The module and the EMA weights of the latest good checkpoint of a training workdir.

  Args:
    model_config: config.model of the run (`create_model`).
    workdir: a training workdir (`train.train_and_evaluate`), holding `checkpoints/`.
    mesh: the weights are replicated over it (default: all devices).

  Returns:
    (module, variables): `{'params': ...}` and, for models with BatchNorm,
    `'batch_stats'`, as `steps.TrainState.variables(ema=True)` gives them.

  Raises:
    FileNotFoundError: no checkpoint in `<workdir>/checkpoints`.
  """
  workdir = Path(workdir)
  mesh = mesh or parallel.make_mesh()
  model = create_model(model_config)
  with checkpointing.Checkpointer(workdir / 'checkpoints') as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {workdir / "checkpoints"}')
    target = checkpointing.AsSaved(parallel.replicated(mesh))
    state = ckpt.restore({'state': target})['state']
  if not isinstance(state, Mapping) or EMA_PARAMS not in state:
    raise ValueError(
      f'the checkpoints in {workdir / "checkpoints"} hold no {EMA_PARAMS!r}: not a training '
      'workdir of puma_jax.train; give a workdir that train.train_and_evaluate wrote.'
    )
  params, stats = state[EMA_PARAMS], state.get(EMA_BATCH_STATS) or {}
  return model, ({'params': params, 'batch_stats': stats} if stats else {'params': params})


def model_fingerprint(variables: Any) -> str:
  """'sha256:<hex>' over the variables' key paths, dtypes, shapes and bytes.

  `artifacts.tree_fingerprint`: stable across processes, devices and runs.
  Arrays sharded across processes must be fully replicated (as restored weights
  are) so that every process can read them.
  """
  return artifacts.tree_fingerprint(variables)
