"""Export to PyTorch (safetensors): exact round trips, DM-Improves-AT's WRN layout, a NumPy
NCHW forward pass of the exported weights, and `python -m puma_jax.export` on a trained workdir."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from puma_jax import export, model_io, models, pipeline
from puma_jax.models import wide_resnet

ROOT = Path(__file__).resolve().parents[1]

# Tiny versions of the three exported architectures (name, fields, image shape).
MODELS = {
  'wrn': (dict(depth=10, width=1, num_classes=10), (32, 32, 3)),
  'preact_resnet18': (dict(width=8, num_classes=10), (32, 32, 3)),
  'small_cnn': (
    dict(conv_channels=(4, 6), pool_after=(True, True), dense_widths=(12,), num_classes=10),
    (28, 28, 1),
  ),
}


def _variables(name: str, seed: int = 0) -> dict:
  """Random variables of a tiny model, with BatchNorm statistics away from 0 and 1."""
  fields, shape = MODELS[name]
  model = models.create(name, **fields)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *shape)), train=False)
  rng = np.random.default_rng(seed)
  out = jax.tree.map(lambda v: np.asarray(v, np.float32), variables)

  def perturb(path, v):
    leaf = jax.tree_util.keystr(path)
    if leaf.endswith("['var']") or leaf.endswith("['scale']"):
      return rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
    return (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(perturb, out)


def _save(sd: dict, path: Path) -> Path:
  safetensors.numpy.save_file(sd, str(path))
  return path


@pytest.mark.parametrize('name', sorted(MODELS))
def test_export_then_import_round_trips_exactly(name, tmp_path):
  variables = _variables(name)
  sd = models.export_torch_state_dict(name, variables)
  back = models.import_torch_state_dict(
    name, _save(sd, tmp_path / 'w.safetensors'), **MODELS[name][0]
  )
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
    assert a.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  # And the other way: a state_dict read and written again is the same state_dict.
  again = models.export_torch_state_dict(name, back)
  assert sorted(again) == sorted(sd)
  for k in sd:
    assert again[k].dtype == sd[k].dtype
    np.testing.assert_array_equal(again[k], sd[k])


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors', ''])
def test_import_reads_npz_and_safetensors(suffix, tmp_path):
  variables = _variables('preact_resnet18', seed=1)
  sd = models.export_torch_state_dict('preact_resnet18', variables)
  path = tmp_path / f'w{suffix}'
  if suffix == '.npz':
    np.savez(path, **sd)
  else:
    _save(sd, path)  # The format comes from the content, not the name.
  back = models.import_torch_state_dict('preact_resnet18', path, **MODELS['preact_resnet18'][0])
  np.testing.assert_array_equal(
    back['params']['linear']['kernel'], variables['params']['linear']['kernel']
  )


def test_an_unreadable_weights_file_names_it(tmp_path):
  path = tmp_path / 'w.safetensors'
  path.write_bytes(b'neither a zip nor safetensors')
  with pytest.raises(ValueError, match=f'cannot read PyTorch weights {path}'):
    models.import_torch_state_dict('wrn', path)


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
  """nn.BatchNorm2d(c)'s state_dict entries."""
  return [
    (f'{prefix}.weight', (c,)),
    (f'{prefix}.bias', (c,)),
    (f'{prefix}.running_mean', (c,)),
    (f'{prefix}.running_var', (c,)),
    (f'{prefix}.num_batches_tracked', ()),
  ]


# DM-Improves-AT core/models/wideresnetwithswish.py, WideResNet(num_classes=10, depth=10,
# width=1): num_channels [16, 16, 32, 64], one _Block per _BlockGroup; a block has a
# `shortcut` conv iff in_planes != out_planes (so block 0 of group 0, 16 -> 16, has none).
WRN_10_1_STATE_DICT = [
  ('init_conv.weight', (16, 3, 3, 3)),
  *_bn('layer.0.block.0.batchnorm_0', 16),
  ('layer.0.block.0.conv_0.weight', (16, 16, 3, 3)),
  *_bn('layer.0.block.0.batchnorm_1', 16),
  ('layer.0.block.0.conv_1.weight', (16, 16, 3, 3)),
  *_bn('layer.1.block.0.batchnorm_0', 16),
  ('layer.1.block.0.conv_0.weight', (32, 16, 3, 3)),
  *_bn('layer.1.block.0.batchnorm_1', 32),
  ('layer.1.block.0.conv_1.weight', (32, 32, 3, 3)),
  ('layer.1.block.0.shortcut.weight', (32, 16, 1, 1)),
  *_bn('layer.2.block.0.batchnorm_0', 32),
  ('layer.2.block.0.conv_0.weight', (64, 32, 3, 3)),
  *_bn('layer.2.block.0.batchnorm_1', 64),
  ('layer.2.block.0.conv_1.weight', (64, 64, 3, 3)),
  ('layer.2.block.0.shortcut.weight', (64, 32, 1, 1)),
  *_bn('batchnorm', 64),
  ('logits.weight', (10, 64)),
  ('logits.bias', (10,)),
]


def test_wrn_state_dict_has_dm_improves_at_keys_and_shapes(tmp_path):
  sd = models.export_torch_state_dict('wrn', _variables('wrn'))
  assert [(k, v.shape) for k, v in sd.items()] == WRN_10_1_STATE_DICT  # Also PyTorch's order.
  loaded = safetensors.numpy.load_file(str(_save(sd, tmp_path / 'w.safetensors')))
  assert sorted((k, v.shape) for k, v in loaded.items()) == sorted(WRN_10_1_STATE_DICT)
  assert all(v.dtype == np.int64 for k, v in loaded.items() if k.endswith('num_batches_tracked'))
  assert all(v.dtype == np.float32 for k, v in loaded.items() if 'num_batches' not in k)


def _conv_nchw(x: np.ndarray, w: np.ndarray, stride: int, pad: tuple[int, int, int, int]):
  """F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride) in NumPy: x [N,C,H,W], w [O,I,h,w]."""
  left, right, top, bottom = pad
  x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
  _, _, kh, kw = w.shape
  n, c, h, wd = x.shape
  ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = np.zeros((n, w.shape[0], ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
      out += np.einsum('nchw,oc->nohw', patch, w[:, :, i, j])
  return out


def _dm_wrn_forward(sd: dict, x_nchw: np.ndarray, mean, std) -> np.ndarray:
  """DM-Improves-AT's WideResNet.forward (eval mode, swish) on an exported state_dict, NCHW."""
  p = {k: v.astype(np.float64) for k, v in sd.items()}

  def bn(v, key):  # nn.BatchNorm2d(eps=1e-5) in eval mode.
    scale = p[f'{key}.weight'] / np.sqrt(p[f'{key}.running_var'] + 1e-5)
    shift = p[f'{key}.bias'] - p[f'{key}.running_mean'] * scale
    return v * scale[None, :, None, None] + shift[None, :, None, None]

  def silu(v):
    return v / (1 + np.exp(-v))

  out = (x_nchw - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))
  out = _conv_nchw(out, p['init_conv.weight'], 1, (1, 1, 1, 1))
  groups = sorted(
    {(int(k.split('.')[1]), int(k.split('.')[3])) for k in p if k.startswith('layer.')}
  )
  for g, i in groups:
    b = f'layer.{g}.block.{i}'
    stride = 2 if g > 0 and i == 0 else 1
    has_shortcut = f'{b}.shortcut.weight' in p
    x = out
    if has_shortcut:
      x = silu(bn(x, f'{b}.batchnorm_0'))
      v = x
    else:
      v = silu(bn(x, f'{b}.batchnorm_0'))
    v = _conv_nchw(
      v, p[f'{b}.conv_0.weight'], stride, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)
    )
    v = silu(bn(v, f'{b}.batchnorm_1'))
    v = _conv_nchw(v, p[f'{b}.conv_1.weight'], 1, (1, 1, 1, 1))
    out = (
      _conv_nchw(x, p[f'{b}.shortcut.weight'], stride, (0, 0, 0, 0)) if has_shortcut else x
    ) + v
  out = silu(bn(out, 'batchnorm'))
  out = out.reshape(out.shape[0], out.shape[1], -1).mean(-1)  # F.avg_pool2d(out, 8) on 8x8.
  return out @ p['logits.weight'].T + p['logits.bias']


def test_numpy_nchw_forward_of_the_exported_wrn_reproduces_the_jax_logits(tmp_path):
  fields, shape = MODELS['wrn']
  mean, std = wide_resnet.CIFAR100_MEAN, wide_resnet.CIFAR100_STD
  model = models.create('wrn', activation='swish', mean=mean, std=std, **fields)
  variables = _variables('wrn', seed=3)
  path = _save(models.export_torch_state_dict('wrn', variables), tmp_path / 'wrn.safetensors')
  x = np.random.default_rng(4).uniform(0, 1, (4, *shape)).astype(np.float32)
  want = np.asarray(model.apply(variables, jnp.asarray(x), train=False))
  got = _dm_wrn_forward(
    safetensors.numpy.load_file(str(path)), x.transpose(0, 3, 1, 2).astype(np.float64), mean, std
  )
  assert np.std(want) > 0.1  # Logits that differ, so the comparison means something.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A pipeline workdir trained for a few steps (prepare, prune=none, train)."""
  from configs import default

  config = default.get_config('tiny')
  config.data.generated.kind = 'none'
  config.data.generated_fraction = 0.0
  config.prune.strategy = 'none'
  config.train.num_steps = 4
  config.train.eval_every_steps = 1000
  config.train.checkpoint_every_steps = 4
  config.model.conv_channels = (4, 8)
  config.model.dense_widths = (16,)
  workdir = tmp_path_factory.mktemp('export') / 'w'
  for stage in ('prepare', 'prune', 'train'):
    pipeline.run(config, workdir, stage=stage)
  return workdir, config


def _export_cli(*args: str) -> subprocess.CompletedProcess:
  """Runs `python -m puma_jax.export ARGS` from the repository root."""
  return subprocess.run(
    [sys.executable, '-m', 'puma_jax.export', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_exports_the_ema_weights_of_a_trained_workdir(trained_workdir, tmp_path):
  workdir, config = trained_workdir
  out = tmp_path / 'model.safetensors'
  result = _export_cli(f'--workdir={workdir}', f'--out={out}')
  assert result.returncode == 0, result.stderr
  _, ema = model_io.restore_ema_variables(config.model, workdir / 'train')
  fields = {k: v for k, v in config.model.items() if k not in ('name', 'dtype')}
  back = models.import_torch_state_dict('small_cnn', out, **fields)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ema), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  with safetensors.safe_open(str(out), 'numpy') as f:
    meta = f.metadata()
  assert json.loads(meta['puma_jax.model'])['conv_channels'] == [4, 8]
  assert json.loads(meta['puma_jax.image_shape']) == [28, 28, 1]


def test_cli_refuses_a_workdir_without_a_run(tmp_path):
  result = _export_cli(f'--workdir={tmp_path}', f'--out={tmp_path / "m"}')
  assert result.returncode == 1
  assert 'puma_jax.export: error: ' in result.stderr and 'config.json is missing' in result.stderr
  assert 'Traceback' not in result.stderr and not (tmp_path / 'm').exists()


def test_export_refuses_an_unfinished_run(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  marker = workdir / 'train' / 'stage.json'
  saved = marker.read_bytes()
  marker.unlink()
  try:
    with pytest.raises(export.DataError, match='--allow_unfinished'):
      export.export(workdir, tmp_path / 'm.safetensors')
    export.export(workdir, tmp_path / 'm.safetensors', allow_unfinished=True)
  finally:
    marker.write_bytes(saved)
  assert (tmp_path / 'm.safetensors').exists()
