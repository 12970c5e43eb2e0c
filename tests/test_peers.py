"""experiments/peers: the JAX-side export, and the PyTorch peers where their virtualenv exists.

The export tests need no torch. The peer tests run the peers' own code in the peer
virtualenv ($PUMA_PEERS_VENV, else .peers/venv: `bash experiments/peers/setup_venv.sh`)
and skip when it is absent.
"""

import json
import re
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models_peer import _resnet_forward, _resnet_state_dict

from experiments import peers
from experiments.peers import export
from puma_jax import models
from puma_jax.attacks import deepfool
from puma_jax.models import preact_resnet

PEER_PYTHON = str(peers.python())
needs_peer = pytest.mark.skipif(
  not Path(PEER_PYTHON).exists(), reason=peers.missing_venv_message(PEER_PYTHON)
)


def _jax_logits(model, variables, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


# ------------------------------------------------------------------ export (no torch)
def test_preact_export_round_trips_exactly_and_keeps_the_logits():
  sd = _resnet_state_dict(np.random.RandomState(0), width=8)
  variables = preact_resnet.convert_torch_state_dict(sd, width=8, num_classes=10)
  model = models.create('preact_resnet18', num_classes=10, width=8)
  arch = export.architecture(model, (32, 32, 3))
  assert arch == json.loads(json.dumps(arch))
  assert arch['name'] == 'preact_resnet18' and arch['kwargs']['width'] == 8
  back = export.to_torch_state_dict(variables, arch)
  expected = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  assert sorted(back) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  x = np.random.RandomState(1).rand(2, 3, 32, 32).astype(np.float32)
  np.testing.assert_allclose(
    _resnet_forward({k: v.astype(np.float64) for k, v in back.items()}, x),
    _jax_logits(model, variables, x.transpose(0, 2, 3, 1)),
    rtol=1e-4,
    atol=2e-5,
  )


def test_random_variables_hold_the_batch_statistics():
  model = models.create('preact_resnet18', num_classes=10, width=4)
  x = np.random.default_rng(0).uniform(size=(8, 32, 32, 3)).astype(np.float32)
  variables = export.random_variables(model, x, seed=0)
  # The first BatchNorm normalises conv1's output: its statistics over the batch.
  h = jax.lax.conv_general_dilated(
    x,
    variables['params']['conv1']['kernel'],
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  stats = variables['batch_stats']['layer1_0']['bn1']
  np.testing.assert_allclose(stats['mean'], h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], h.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_bench_artifacts_round_trip(tmp_path):
  export.write_bench_artifacts(tmp_path, ['small_cnn'], n=4, seed=3)
  with np.load(tmp_path / 'inputs.npz') as f:
    x, x_nchw, labels = f['x_nhwc'], f['x_nchw'], f['train_labels']
  np.testing.assert_array_equal(x_nchw, x.transpose(0, 3, 1, 2))
  assert x.shape == (4, 32, 32, 3) and labels.dtype == np.int64
  kw = export.BENCH_MODELS['small_cnn']
  model = models.create('small_cnn', num_classes=10, **kw)
  variables = models.import_torch_state_dict(
    'small_cnn', str(tmp_path / 'small_cnn' / 'model.npz'), **kw
  )
  with np.load(tmp_path / 'small_cnn' / 'reference.npz') as f:
    np.testing.assert_allclose(_jax_logits(model, variables, x), f['logits'], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(f['labels'], f['logits'].argmax(-1))
  arch = json.loads((tmp_path / 'small_cnn' / 'model.json').read_text())
  assert arch['kwargs']['conv_channels'] == [32, 64, 128] and arch['image_shape'] == [32, 32, 3]


def test_peer_interpreter_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('PUMA_PEERS_VENV', str(tmp_path))
  assert peers.python() == tmp_path / 'bin' / 'python'
  monkeypatch.delenv('PUMA_PEERS_VENV')
  assert peers.python() == peers.REPO / '.peers' / 'venv' / 'bin' / 'python'


# ------------------------------------------------------------------ the PyTorch peers
def _peer(code: str, *args: str) -> str:
  """Runs `code` with the peer interpreter in experiments/peers; its stdout."""
  proc = subprocess.run(
    [PEER_PYTHON, '-c', code, *args], cwd=peers.HERE, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


@needs_peer
@pytest.mark.parametrize(
  'name, kwargs, image_shape',
  [
    ('small_cnn', dict(mean=(0.5,), std=(0.3,)), (28, 28, 1)),
    ('small_cnn', export.BENCH_MODELS['small_cnn'], (32, 32, 3)),
    ('preact_resnet18', dict(width=8, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.2)), (32, 32, 3)),
  ],
)
def test_torch_models_reproduce_the_jax_logits(tmp_path, name, kwargs, image_shape):
  model = models.create(name, num_classes=10, **kwargs)
  x = np.random.default_rng(0).uniform(size=(6, *image_shape)).astype(np.float32)
  variables = export.random_variables(model, x, seed=1)
  export.write_model(tmp_path, model, variables, image_shape)
  export.save_npz(tmp_path / 'x.npz', x=x.transpose(0, 3, 1, 2).copy())
  out = _peer(
    'import sys, numpy as np, torch, torch_models\n'
    'model, _ = torch_models.load(sys.argv[1])\n'
    'x = torch.from_numpy(np.load(sys.argv[1] + "/x.npz")["x"])\n'
    'with torch.no_grad(): print(model(x).numpy().tolist())',
    str(tmp_path),
  )
  np.testing.assert_allclose(
    np.array(json.loads(out)), _jax_logits(model, variables, x), rtol=1e-4, atol=1e-5
  )


@needs_peer
@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_torch_deepfool_matches_puma_jax(tmp_path, norm):
  kwargs = dict(conv_channels=(8, 16), pool_after=(True, True), dense_widths=(32,))
  model = models.create('small_cnn', num_classes=10, **kwargs)
  x = np.random.default_rng(1).uniform(size=(32, 16, 16, 3)).astype(np.float32)
  variables = export.random_variables(model, x, seed=2)
  labels = _jax_logits(model, variables, x).argmax(-1)
  res = deepfool(
    lambda z: model.apply(variables, z),
    jnp.asarray(x),
    jnp.asarray(labels),
    norm=norm,
    num_candidates=10,
    overshoot=0.02,
    max_iter=50,
    clip=(0.0, 1.0),
  )
  pert = np.asarray(res.perturbation, np.float64).reshape(len(x), -1)
  ours = np.linalg.norm(pert, axis=1) if norm == 'l2' else np.abs(pert).max(axis=1)
  export.write_model(tmp_path, model, variables, x.shape[1:])
  export.save_npz(tmp_path / 'x.npz', x=x.transpose(0, 3, 1, 2).copy(), y=labels.astype(np.int64))
  out = _peer(
    'import sys, json, numpy as np, torch, torch_models, deepfool\n'
    'model, _ = torch_models.load(sys.argv[1])\n'
    'f = np.load(sys.argv[1] + "/x.npz")\n'
    'x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])\n'
    'x_adv, it, flipped = deepfool.batched(model, x, y, norm=sys.argv[2])\n'
    'print(json.dumps([deepfool.margins(x_adv, x, sys.argv[2]).tolist(), it.tolist(),'
    ' flipped.tolist()]))',
    str(tmp_path),
    norm,
  )
  theirs, iterations, flipped = (np.array(v) for v in json.loads(out))
  assert flipped.all() and np.asarray(res.converged).all()
  same = np.abs(theirs - ours) <= 3e-4 + 1e-3 * ours
  assert same.mean() >= 0.9, (theirs, ours)
  assert np.mean(iterations == np.asarray(res.iterations)) >= 0.9


@needs_peer
def test_bench_attacks_worker_runs_deepfool_and_train_steps(tmp_path):
  export.write_bench_artifacts(tmp_path, ['small_cnn'], n=8)
  requests = [
    {'cmd': 'load', 'model': 'small_cnn'},
    {'cmd': 'deepfool', 'model': 'small_cnn', 'impl': 'batched', 'n': 4, 'norm': 'linf'},
    {'cmd': 'deepfool', 'model': 'small_cnn', 'impl': 'foolbox', 'n': 4, 'norm': 'l2'},
    {'cmd': 'train', 'model': 'small_cnn', 'kind': 'pgd_at', 'batch': 8},
    {'cmd': 'train', 'model': 'small_cnn', 'kind': 'trades', 'batch': 8},
    {'cmd': 'quit'},
  ]
  proc = subprocess.run(
    [PEER_PYTHON, str(peers.HERE / 'bench_attacks_worker.py'), '--artifacts', str(tmp_path)],
    input=''.join(json.dumps(r) + '\n' for r in requests),
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr
  load, linf, fb, pgd_at, trades = (json.loads(line) for line in proc.stdout.splitlines())
  assert load['logits_max_abs_diff'] < 1e-5
  assert len(linf['margins']) == 4 and 0 < min(linf['margins']) and max(linf['margins']) < 1
  assert len(linf['iterations']) == 4 and 'iterations' not in fb
  for step in (pgd_at, trades):
    assert np.isfinite(step['loss']) and step['wall_s'] > 0


def test_peer_modules_import_neither_jax_nor_puma_jax():
  """The peer virtualenv has neither: only __init__.py and export.py run with puma_jax."""
  pattern = re.compile(r'^\s*(import|from)\s+(jax|flax|puma_jax|experiments)\b', re.M)
  for path in sorted(peers.HERE.glob('*.py')):
    if path.name not in ('__init__.py', 'export.py'):
      assert not pattern.search(path.read_text()), path


def test_setup_script_refuses_bad_input_before_building(tmp_path):
  script = str(peers.HERE / 'setup_venv.sh')
  proc = subprocess.run(['bash', script, str(tmp_path)], capture_output=True, text=True)
  assert proc.returncode == 2 and 'already exists' in proc.stderr
  env = {'PATH': '/usr/bin:/bin', 'AUTOATTACK_SRC': str(tmp_path)}
  target = tmp_path / 'venv'
  proc = subprocess.run(['bash', script, str(target)], capture_output=True, text=True, env=env)
  assert proc.returncode == 2 and 'not a checkout of fra31/auto-attack' in proc.stderr
  assert not target.exists()
  text = (peers.HERE / 'requirements.txt').read_text()
  lines = [line for line in text.splitlines() if line and not line.startswith('#')]
  pins = [line.split('#')[0].strip() for line in lines]
  assert all('==' in p for p in pins), pins
  no_deps = {p.split('==')[0] for p, line in zip(pins, lines, strict=True) if '# no-deps' in line}
  assert no_deps == {'torchattacks', 'foolbox', 'eagerpy'}
