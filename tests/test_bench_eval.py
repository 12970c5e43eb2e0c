"""experiments/bench_eval.py: the PyTorch export, the flag bookkeeping, and a tiny end-to-end run.

The JAX side runs everywhere; the PyTorch side runs only where the peer virtualenv
exists ($PUMA_PEERS_VENV, else .peers/venv in the repository: experiments/peers/setup_venv.sh).
"""

import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import default
from experiments import bench_eval, peers
from experiments.peers import export
from puma_jax import artifacts, checkpointing, datasets, models, steps, train
from puma_jax.models import small_cnn

PEER_PYTHON = str(peers.python())
needs_peer = pytest.mark.skipif(
  not Path(PEER_PYTHON).exists(), reason=peers.missing_venv_message(PEER_PYTHON)
)


# ------------------------------------------------------- NumPy reference (PyTorch NCHW semantics)
def _torch_semantics_forward(sd, arch, x_nchw):
  """Logits of the exported state_dict: NCHW convs, 2x2 max-pools, CHW flatten."""
  arch = arch['kwargs']
  x = np.asarray(x_nchw, np.float64)
  c = x.shape[1]
  if arch['mean'] is not None:
    x = (x - np.reshape(arch['mean'], (1, c, 1, 1))) / np.reshape(arch['std'], (1, c, 1, 1))
  pad = arch['kernel_size'] // 2
  for i, pool in enumerate(arch['pool_after']):
    w, b = sd[f'conv{i + 1}.weight'], sd[f'conv{i + 1}.bias']
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))
    x = np.maximum(np.einsum('nchwij,ocij->nohw', win, w) + b[None, :, None, None], 0)
    if pool:
      n, ch, h, wd = x.shape
      x = x[:, :, : h // 2 * 2, : wd // 2 * 2].reshape(n, ch, h // 2, 2, wd // 2, 2).max((3, 5))
  x = x.reshape(len(x), -1)
  num_dense = len(arch['dense_widths'])
  for j in range(num_dense + 1):
    x = x @ sd[f'fc{j + 1}.weight'].T + sd[f'fc{j + 1}.bias']
    x = np.maximum(x, 0) if j < num_dense else x
  return x


@pytest.mark.parametrize(
  'kwargs, image_shape',
  [
    ({}, (28, 28, 1)),  # the default MNIST model
    # Non-square, odd map sizes, a conv without pooling, two hidden layers, normalisation.
    (
      dict(
        conv_channels=(4, 3, 5),
        pool_after=(True, False, True),
        dense_widths=(7, 6),
        mean=(0.5, 0.4),
        std=(0.2, 0.3),
      ),
      (11, 14, 2),
    ),
  ],
)
def test_export_reproduces_logits_in_pytorch_layout(kwargs, image_shape):
  model = models.create('small_cnn', num_classes=10, **kwargs)
  x = np.random.default_rng(0).uniform(size=(3, *image_shape)).astype(np.float32)
  variables = model.init(jax.random.key(1), x)
  arch = export.architecture(model, image_shape)
  sd = export.to_torch_state_dict(variables, arch)
  ref = _torch_semantics_forward(sd, arch, x.transpose(0, 3, 1, 2))
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), ref, rtol=1e-4, atol=1e-5)
  assert json.loads(json.dumps(arch)) == arch
  if image_shape[0] == image_shape[1]:  # the importer handles square maps: round trip exactly
    back = small_cnn.convert_torch_state_dict(sd, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, back['params'], variables['params'])


def test_export_refuses_other_models():
  with pytest.raises(ValueError, match='small_cnn'):
    export.architecture(models.create('wrn', num_classes=10, depth=10, width=1), (32, 32, 3))
  with pytest.raises(ValueError, match='float32'):
    export.architecture(models.create('small_cnn', num_classes=10, dtype='bfloat16'), (28, 28, 1))


def test_agreement_and_validity():
  a = np.array([1, 1, 0, 0, 1], bool)
  b = np.array([1, 0, 1, 0, 1], bool)
  assert bench_eval.agreement(a, b) == {'both': 2, 'only_first': 1, 'only_second': 1, 'neither': 1}
  x = np.full((4, 2, 2, 1), 0.5, np.float32)
  adv = x.copy()
  adv[0, 0, 0, 0] += 0.3  # on the L-infinity boundary: valid
  adv[1, 0, 0, 0] += 0.31  # outside the ball
  adv[2] += 0.3  # every pixel moved by eps: valid in L-infinity, not in L2
  adv[3, 1, 1, 0] = 1.001  # outside [0, 1]
  valid = bench_eval.valid_adversarial(x, adv, norm='linf', eps=0.3)
  np.testing.assert_array_equal(valid, [True, False, True, False])
  valid_l2 = bench_eval.valid_adversarial(x, adv, norm='l2', eps=0.3)
  np.testing.assert_array_equal(valid_l2, [True, False, False, False])


def test_pipeline_check_compares_flags(tmp_path):
  settings = {'norm': 'linf', 'eps': 0.3, 'seed': 0}
  results = tmp_path / 'evaluate' / 'results'
  names = ['clean', 'pgd_ce', 'pgd_cw', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
  artifacts.write_json(
    results / 'settings.json', {**settings, 'model_fingerprint': 'sha256:x', 'stages': names}
  )
  ours = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  saved = np.zeros((4, 7), bool)
  saved[:3, [0, 3, 4, 5, 6]] = ours
  saved[1, 4] = True  # example 1 differs after APGD-T
  (results / 'batches').mkdir()
  np.savez(results / 'batches' / '000000.npz', index=np.arange(4), flags=saved)
  msg = bench_eval.pipeline_check(tmp_path, ours, 'sha256:x', settings)
  assert msg.startswith('2/3 examples')
  assert 'other settings' in bench_eval.pipeline_check(tmp_path, ours, 'sha256:y', settings)


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir shaped like a finished tiny pipeline run: config.json, data/, train/."""
  wd = tmp_path_factory.mktemp('workdir')
  config = default.get_config('tiny')
  artifacts.write_json(wd / 'config.json', json.loads(config.to_json_best_effort()))
  prepared = datasets.prepare(config.data, wd / 'data')
  model = train.create_model(config.model)
  tx, _ = train.optimizer_from_config(config)
  state = steps.create_train_state(jax.random.key(0), model, tx, prepared.real_test.image_shape)
  with checkpointing.Checkpointer(wd / 'train' / 'checkpoints') as ckpt:
    ckpt.save(0, {'state': state, 'data_iter': {'step': 0}})
    ckpt.wait_until_finished()
  artifacts.write_json(wd / 'train' / 'stage.json', {})
  return wd


def _run_main(workdir, out, *extra):
  args = ['--workdir', str(workdir), '--num_examples', '6', '--batch_size', '4', '--out', str(out)]
  return bench_eval.main(args + ['--jax_budgets', 'quick', *extra])


def test_main_jax_side(workdir, tmp_path):
  report = _run_main(workdir, tmp_path, '--peers', '')
  saved = json.loads((tmp_path / 'bench_eval.json').read_text())
  assert saved['num_examples'] == 6 and saved['eps'] == pytest.approx(0.3)
  (row,) = saved['rows']
  assert row['side'] == 'jax' and row['budgets'] == bench_eval.BUDGETS['quick']
  acc = [row['accuracy'][s] for s in bench_eval.STAGES]
  assert all(a >= b for a, b in zip(acc, acc[1:], strict=False)), acc  # never increases
  assert row['robust_count'] == round(row['accuracy']['square'] * 6 / 100)
  assert row['invalid_adversarial'] == 0
  assert row['rows_per_call'] == 4 and row['wall_s'] > 0 and row['compile_wall_s'] > 0
  assert (tmp_path / 'bench_eval.md').read_text().startswith('AutoAttack on the first 6')
  assert report['verdicts'] == []  # no peer row to compare with


def test_main_refuses_unfinished_training(workdir, tmp_path):
  (workdir / 'train' / 'stage.json').rename(workdir / 'stage.json.bak')
  try:
    with pytest.raises(SystemExit, match='stage.json is missing'):
      _run_main(workdir, tmp_path, '--peers', '')
  finally:
    (workdir / 'stage.json.bak').rename(workdir / 'train' / 'stage.json')


def test_main_without_the_peer_virtualenv(workdir, tmp_path, monkeypatch):
  monkeypatch.setenv('PUMA_PEERS_VENV', str(tmp_path / 'nowhere'))
  with pytest.raises(SystemExit, match='setup_venv.sh'):
    _run_main(workdir, tmp_path, '--peers', 'autoattack')


@needs_peer
def test_main_with_peers(workdir, tmp_path):
  report = _run_main(workdir, tmp_path, '--autoattack_budgets', 'quick', '--peer_budgets', 'quick')
  jax_row, original, ta = report['rows']
  assert [original['side'], ta['side']] == ['autoattack', 'torchattacks']
  assert report['logits_max_abs_diff'] < 1e-5
  for peer_row in (original, ta):
    assert peer_row['budgets']['apgd_steps'] == 5 and peer_row['budgets']['num_targets'] == 9
    assert peer_row['budgets']['square_queries'] == 50
    assert peer_row['clean_prediction_mismatches'] == 0 and peer_row['invalid_adversarial'] == 0
    assert peer_row['accuracy']['clean'] == jax_row['accuracy']['clean']
    acc = [peer_row['accuracy'][s] for s in bench_eval.STAGES]
    assert all(a >= b for a, b in zip(acc, acc[1:], strict=False)), acc
  for agree in report['agreement']:
    assert sum(agree['counts'].values()) == 6
    assert agree['same_after_each_attack']['clean'] == 6
    assert len(agree['only_first_examples']) == agree['counts']['only_first']
  assert len(report['verdicts']) == 2 and "budget 'quick'" in report['verdicts'][0]
  with np.load(tmp_path / 'flags.npz') as f:
    assert f['autoattack_quick'].shape == (6, 5)
    np.testing.assert_array_equal(f['autoattack_quick'][:, 0], f['jax_quick'][:, 0])


@needs_peer
def test_peer_stops_when_logits_differ(tmp_path):
  model = models.create('small_cnn', num_classes=10)
  x = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), x)
  export.write_model(tmp_path, model, variables, (28, 28, 1))
  logits = np.array(model.apply(variables, x))
  logits[2, 3] += 1e-3  # what a layout mistake would look like
  export.save_npz(
    tmp_path / 'inputs.npz',
    x_nchw=x.transpose(0, 3, 1, 2).copy(),
    y=np.zeros(4, np.int64),
    jax_logits=logits,
  )
  out = tmp_path / 'peer.npz'
  cmd = [PEER_PYTHON, str(bench_eval.PEER_SCRIPT), '--dir', str(tmp_path), '--out', str(out)]
  budgets = dict(apgd_steps=1, fab_steps=1, num_targets=9, square_queries=1)
  proc = subprocess.run(
    cmd + ['--eps', '0.3', '--budgets', json.dumps(budgets)], capture_output=True, text=True
  )
  assert proc.returncode == 3, proc.stderr
  assert 'does not reproduce the JAX logits' in proc.stderr and not out.exists()
