"""Model I/O: EMA weights restored without the optimiser, and the layers above it."""

import ast
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import pytest

from puma_jax import checkpointing, model_io, parallel, steps

PACKAGE = Path(model_io.__file__).parent

MODELS = {
  'small_cnn': dict(name='small_cnn', num_classes=10, conv_channels=(4, 8), dense_widths=(16,)),
  'wrn': dict(name='wrn', num_classes=10, depth=10, width=1, mean=(0.5,), std=(0.5,)),
}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_ema_weights_restore_whatever_optimiser_trained_them(name, tmp_path):
  model_config = ml_collections.ConfigDict(MODELS[name])
  model = model_io.create_model(model_config)
  mesh = parallel.make_mesh()
  # An optimiser no config describes: nothing in model_io may need to rebuild it.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = steps.create_train_state(jax.random.key(0), model, tx, (28, 28, 1))
  state = state.replace(  # EMA weights that differ from the current ones
    ema_params=jax.tree.map(lambda p: p * 0.5 + 1.0, state.params),
    ema_batch_stats=jax.tree.map(lambda s: s + 2.0, state.batch_stats),
  )
  state = parallel.replicate(state, mesh)
  with checkpointing.Checkpointer(tmp_path / 'checkpoints') as ckpt:
    ckpt.save(3, {'state': state, 'data_iter': {'step': 3}})
  restored_model, variables = model_io.restore_ema_variables(model_config, tmp_path, mesh=mesh)
  assert restored_model == model
  expected = state.variables(ema=True)
  assert jax.tree.structure(variables) == jax.tree.structure(expected)
  assert ('batch_stats' in variables) == (name == 'wrn')
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert model_io.model_fingerprint(variables) == model_io.model_fingerprint(expected)


def test_a_workdir_without_checkpoints_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'checkpoints')):
    model_io.restore_ema_variables(ml_collections.ConfigDict(MODELS['small_cnn']), tmp_path)


def _imports(module: str) -> set[str]:
  """The puma_jax modules that `puma_jax/<module>.py` imports, at any depth of its code."""
  tree = ast.parse((PACKAGE / f'{module}.py').read_text())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('puma_jax'):
      if node.module == 'puma_jax':
        found |= {a.name for a in node.names}
      else:
        found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('puma_jax.')}
  return found


@pytest.mark.parametrize(
  'module, above',
  [
    ('model_io', {'train', 'margins', 'evaluate', 'evaluator', 'pipeline', 'export', 'steps'}),
    ('evaluator', {'train', 'margins', 'evaluate', 'pipeline', 'stages', 'model_io'}),
    ('evaluate', {'train', 'margins', 'pipeline', 'stages'}),  # its command line included
    ('export', {'train', 'margins', 'evaluate', 'pipeline'}),
  ],
)
def test_no_module_imports_one_above_it(module, above):
  assert _imports(module) & above == set()
  assert 'models' in _imports('model_io')  # the check sees imports
