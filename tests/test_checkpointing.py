"""Orbax checkpoints: sharded round trip on 4 devices, keep-last-N, partial saves ignored."""

import collections
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puma_jax import checkpointing, parallel


def _state(mesh, offset: float = 0.0):
  """A train-state-like pytree: data-sharded, replicated, scalar and NumPy leaves."""
  return {
    'params': {
      'w': jax.device_put(jnp.arange(32.0).reshape(8, 4) + offset, parallel.data_sharding(mesh)),
      'b': parallel.replicate(jnp.full((3,), 2.0 + offset, jnp.bfloat16), mesh),
    },
    'step': parallel.replicate(jnp.asarray(int(offset), jnp.int32), mesh),
    'host': np.arange(5, dtype=np.int64) + int(offset),
  }


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def mesh():
  return parallel.make_mesh()


def test_round_trip_of_sharded_arrays(tmp_path, mesh):
  state = _state(mesh, offset=1.0)
  with checkpointing.Checkpointer(tmp_path / 'ckpt') as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(10, {'state': state, 'data_iter': {'position': 1280, 'epoch': 0}})
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 10

  # A new manager (as after a restart) restores onto the shardings of the target.
  with checkpointing.Checkpointer(tmp_path / 'ckpt') as ckpt:
    target = checkpointing.abstract_target(_state(mesh))
    restored = ckpt.restore({'state': target, 'data_iter': None})
  _assert_tree_equal(restored['state'], state)
  assert restored['data_iter'] == {'position': 1280, 'epoch': 0}
  w = restored['state']['params']['w']
  assert w.sharding == parallel.data_sharding(mesh)
  assert len(w.addressable_shards) == 4 and w.addressable_shards[0].data.shape == (2, 4)
  assert restored['state']['params']['b'].sharding == parallel.replicated(mesh)
  assert isinstance(restored['state']['host'], np.ndarray)


def test_restore_onto_other_shardings(tmp_path, mesh):
  state = _state(mesh, offset=3.0)
  with checkpointing.Checkpointer(tmp_path / 'ckpt') as ckpt:
    ckpt.save(3, {'state': state})
  with checkpointing.Checkpointer(tmp_path / 'ckpt') as ckpt:
    # Everything replicated this time, from ShapeDtypeStructs (no arrays allocated).
    shapes = jax.eval_shape(lambda: {k: v for k, v in _state(mesh).items() if k != 'host'})
    target = checkpointing.abstract_target(shapes, parallel.replicated(mesh))
    target['host'] = np.zeros(5, np.int64)
    restored = ckpt.restore({'state': target})['state']
  assert restored['params']['w'].sharding == parallel.replicated(mesh)
  _assert_tree_equal(restored, state)


def test_async_save_survives_deleting_the_saved_arrays(tmp_path, mesh):
  # The train loop donates the state right after saving it; the save must not care.
  state = _state(mesh, offset=5.0)
  expected = jax.tree.map(np.asarray, state)
  with checkpointing.Checkpointer(tmp_path / 'ckpt', async_save=True) as ckpt:
    ckpt.save(5, {'state': state})
    for leaf in jax.tree.leaves(state):
      if isinstance(leaf, jax.Array):
        leaf.delete()
    ckpt.wait_until_finished()
    restored = ckpt.restore({'state': checkpointing.abstract_target(_state(mesh))})['state']
  _assert_tree_equal(restored, expected)


def test_keeps_the_last_n_and_nothing_else_is_deleted(tmp_path, mesh):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text('{"step": 1}\n')
  with checkpointing.Checkpointer(workdir / 'checkpoints', keep_last=2) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, {'state': _state(mesh, offset=step), 'data_iter': {'step': step}})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [4, 5]
    assert ckpt.save(5, {'state': _state(mesh)}) is False  # an existing step is not rewritten
    restored = ckpt.restore({'state': _state(mesh), 'data_iter': None}, step=4)
  _assert_tree_equal(restored['state'], _state(mesh, offset=4))
  assert restored['data_iter'] == {'step': 4}
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.is_dir()) == ['4', '5']
  assert (workdir / 'metrics.jsonl').read_text() == '{"step": 1}\n'


def test_a_partially_written_checkpoint_is_not_the_latest(tmp_path, mesh):
  directory = tmp_path / 'ckpt'
  with checkpointing.Checkpointer(directory) as ckpt:
    ckpt.save(1, {'state': _state(mesh, offset=1), 'data_iter': {'step': 1}})
  # What an interrupted save of step 7 leaves: Orbax's temporary folder, never renamed.
  # (A full copy of a good step, so only the name marks it as unfinished.)
  shutil.copytree(directory / '1', directory / '7.orbax-checkpoint-tmp-1700000000')
  with checkpointing.Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]
    restored = ckpt.restore({'state': _state(mesh), 'data_iter': None})
    _assert_tree_equal(restored['state'], _state(mesh, offset=1))
    assert ckpt.save(2, {'state': _state(mesh, offset=2)})
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 2
  assert not (directory / '7.orbax-checkpoint-tmp-1700000000').exists()  # cleaned up at start


def test_errors(tmp_path, mesh):
  with checkpointing.Checkpointer(tmp_path / 'ckpt') as ckpt:
    with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
      ckpt.restore({'state': _state(mesh)})
    with pytest.raises(TypeError, match="'data_iter' is not JSON"):
      ckpt.save(1, {'data_iter': {'rng': np.random.default_rng(0)}})
    ckpt.save(1, {'state': _state(mesh)})
    with pytest.raises(KeyError, match='data_iter'):
      ckpt.restore({'state': _state(mesh), 'data_iter': None})
    with pytest.raises(FileNotFoundError, match='step 9'):
      ckpt.restore({'state': _state(mesh)}, step=9)
  with pytest.raises(ValueError, match='keep_last'):
    checkpointing.Checkpointer(tmp_path / 'other', keep_last=0)
  with pytest.raises(ValueError, match='no sharding'):
    checkpointing.abstract_target({'w': jax.ShapeDtypeStruct((2,), jnp.float32)})


_WORKER = """
import os, sys
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update('jax_num_cpu_devices', 2)
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=pid)
import numpy as np
from puma_jax import checkpointing, parallel

mesh = parallel.make_mesh()
assert jax.device_count() == 4 and jax.local_device_count() == 2
full = np.arange(16.0).reshape(8, 2)
w = jax.make_array_from_callback((8, 2), parallel.data_sharding(mesh), lambda i: full[i])
with checkpointing.Checkpointer(directory, keep_last=2) as ckpt:
  for step in (1, 2, 3):
    ckpt.save(step, {'state': {'w': w * step}, 'data_iter': {'step': step}})
  ckpt.wait_until_finished()
  restored = ckpt.restore({'state': {'w': w}, 'data_iter': None})
  for shard in restored['state']['w'].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), 3 * full[shard.index])
  print('RESULT', pid, ckpt.all_steps(), restored['data_iter'], flush=True)
  try:
    ckpt.save(4, {'data_iter': {'process': pid}})
  except AssertionError as e:
    print('MISMATCH', pid, 'differs between processes' in str(e), flush=True)
"""


def test_two_processes(tmp_path):
  """Two JAX processes (2 CPU devices each) save and restore one sharded checkpoint."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER)
  root = Path(__file__).resolve().parents[1]
  env = {**os.environ, 'PYTHONPATH': str(root), 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(pid), str(port), str(tmp_path / 'ckpt')],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in (0, 1)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, out[-3000:]
    assert f"RESULT {pid} [2, 3] {{'step': 3}}" in out, out[-3000:]
    assert f'MISMATCH {pid} True' in out, out[-3000:]
  assert sorted(p.name for p in (tmp_path / 'ckpt').iterdir() if p.is_dir()) == ['2', '3']


def _flip_middle_of_largest_file(item_dir: Path, size: int = 4096) -> Path:
  """Inverts `size` bytes in the middle of the item's largest file (its array data)."""
  path = max((p for p in item_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  for i in range(max(0, mid - size // 2), min(len(data), mid + size // 2)):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))
  return path


def _big_state(mesh, offset: float):
  w = np.random.default_rng(int(offset)).standard_normal((256, 256)).astype(np.float32)
  return {'w': parallel.replicate(jnp.asarray(w), mesh)}


def _swap_data(directory: Path) -> None:
  """Puts step 1's state data under step 2: valid data that Orbax reads without complaint."""
  shutil.rmtree(directory / '2' / 'state')
  shutil.copytree(directory / '1' / 'state', directory / '2' / 'state')


@pytest.mark.parametrize('damage', ['flipped_bytes', 'other_valid_data'])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, mesh, caplog, damage):
  directory = tmp_path / 'ckpt'
  with checkpointing.Checkpointer(directory) as ckpt:
    for step in (1, 2):
      ckpt.save(step, {'state': _big_state(mesh, step), 'data_iter': {'step': step}})
  if damage == 'flipped_bytes':
    _flip_middle_of_largest_file(directory / '2' / 'state')
  else:
    _swap_data(directory)
  target = {'state': checkpointing.abstract_target(_big_state(mesh, 0)), 'data_iter': None}
  with checkpointing.Checkpointer(directory) as ckpt:
    with caplog.at_level(logging.WARNING):
      step, restored = ckpt.restore_latest(target)
    assert step == 1 and restored['data_iter'] == {'step': 1}
    _assert_tree_equal(restored['state'], _big_state(mesh, 1))
    assert f'checkpoint {directory / "2"} is damaged' in caplog.text
    if damage == 'other_valid_data':  # only the checksums see this damage
      with pytest.raises(checkpointing.DamagedCheckpointError, match=r"2/state.*\['w'\]"):
        ckpt.restore(target, step=2)
    # Training goes on from step 1 and saves step 2 again: the damaged one is replaced.
    assert ckpt.save(2, {'state': _big_state(mesh, 2), 'data_iter': {'step': 2}})
    ckpt.wait_until_finished()
    step, restored = ckpt.restore_latest(target)
  assert step == 2
  _assert_tree_equal(restored['state'], _big_state(mesh, 2))


def test_every_checkpoint_damaged_is_an_error(tmp_path, mesh):
  directory = tmp_path / 'ckpt'
  with checkpointing.Checkpointer(directory) as ckpt:
    ckpt.save(1, {'state': _big_state(mesh, 1)})
    ckpt.save(2, {'state': _big_state(mesh, 2)})
  (directory / '1' / 'state').rename(tmp_path / 'state_1')  # swap the two steps' data
  (directory / '2' / 'state').rename(directory / '1' / 'state')
  (tmp_path / 'state_1').rename(directory / '2' / 'state')
  with checkpointing.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpointing.DamagedCheckpointError, match='every checkpoint'):
      ckpt.restore({'state': checkpointing.abstract_target(_big_state(mesh, 0))})


@flax.struct.dataclass
class _Holder:
  """A train-state-like dataclass holding a named tuple and a tuple, as optimiser states do."""

  params: Any
  opt_state: Any


_Trace = collections.namedtuple('_Trace', 'trace')


@pytest.mark.parametrize('damage', [None, 'flipped_bytes', 'other_valid_data'])
def test_restore_as_saved_needs_no_object_of_the_saved_type(tmp_path, mesh, caplog, damage):
  def holder(step):
    w = _big_state(mesh, step)['w']
    return _Holder(params={'w': w}, opt_state=(_Trace(trace={'w': w + 1.0}), {'count': w[0, :2]}))

  directory = tmp_path / 'ckpt'
  with checkpointing.Checkpointer(directory) as ckpt:
    for step in (1, 2):
      ckpt.save(step, {'state': holder(step)})
  if damage == 'flipped_bytes':
    _flip_middle_of_largest_file(directory / '2' / 'state')
  elif damage == 'other_valid_data':
    _swap_data(directory)
  target = {'state': checkpointing.AsSaved(parallel.replicated(mesh))}
  with checkpointing.Checkpointer(directory) as ckpt, caplog.at_level(logging.WARNING):
    step, restored = ckpt.restore_latest(target)
  expected = 2 if damage is None else 1
  assert step == expected
  assert ('is damaged' in caplog.text) == (damage is not None)
  want = holder(expected)
  state = restored['state']
  _assert_tree_equal(state['params'], want.params)
  _assert_tree_equal(state['opt_state'][0]['trace'], want.opt_state[0].trace)
  _assert_tree_equal(state['opt_state'][1], want.opt_state[1])
  assert state['params']['w'].sharding == parallel.replicated(mesh)
