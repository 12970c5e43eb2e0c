"""The margin stage across real processes: kill-and-resume, and two hosts sharing the shards."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from puma_jax import margins, parallel
from puma_jax.datasets import sidecar, testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_margins import SETTINGS, tiny_model  # noqa: E402

# Runs compute_margins on the splits whose dataset folders are given, with the model
# and settings of test_margins; prints the run as JSON and saves the arrays.
_WORKER = """
import json, sys
args = json.loads(sys.argv[1])
import jax
jax.config.update('jax_num_cpu_devices', args['devices'])
# Workers of one test share compiled programs (the test's own process does not).
jax.config.update('jax_compilation_cache_dir', args['cache_dir'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
if args.get('port'):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    f"localhost:{args['port']}", num_processes=2, process_id=args['process_id']
  )
import numpy as np
sys.path.insert(0, args['tests_dir'])
from test_margins import SETTINGS, tiny_model
from puma_jax import margins
from puma_jax.datasets import open_split

if args.get('kill'):  # SIGKILL this process after its n-th 'batch', sidecar 'file' or 'shard'
  import os, signal
  from puma_jax.datasets import sidecar
  event, n = args['kill'].split(':')
  counts = {}

  def count(what):
    counts[what] = counts.get(what, 0) + 1
    if what == event and counts[what] == int(n):
      os.kill(os.getpid(), signal.SIGKILL)

  write_shard, add = sidecar.write_shard, margins.store.ShardBuffer.add

  def counted_write(split, tag, *a, **kw):
    out = write_shard(split, tag, *a, **kw)
    count('file')
    if tag == 'margins':  # a shard's margin is written last
      count('shard')
    return out

  def counted_add(self, *a):
    out = add(self, *a)
    count('batch')
    return out

  sidecar.write_shard, margins.store.ShardBuffer.add = counted_write, counted_add

splits = {
  key: open_split(path, 'train', source_id=sid, data_dir=args['data_dir'])
  for key, (path, sid) in args['splits'].items()
}
model, variables = tiny_model(seed=args['seed'])
res = margins.compute_margins(
  model, variables, splits, settings=SETTINGS, batch_size=8,
  sidecar_root=args['root'], summary_dir=args.get('summary_dir'),
)
np.savez(args['out'], **{f'{k}_margin': v for k, v in res.margins.items()},
         **{f'{k}_iterations': v for k, v in res.iterations.items()})
print('RUN ' + json.dumps(res.run), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _spawn(tmp_path, args: dict) -> subprocess.Popen:
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  args = {
    'tests_dir': str(Path(__file__).resolve().parent),
    'cache_dir': str(tmp_path / 'jax_cache'),
    **args,
  }
  return subprocess.Popen(
    [sys.executable, str(script), json.dumps(args)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[str]:
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outputs


def _run_info(output: str) -> dict:
  lines = [line for line in output.splitlines() if line.startswith('RUN ')]
  assert lines, output[-3000:]
  return json.loads(lines[-1][4:])


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('data')
  splits = {
    'real': testing.make_split(data_dir, num_examples=30, num_shards=3),
    'generated': testing.make_split(data_dir, num_examples=44, num_shards=4, source='generated'),
  }
  spec = {k: (str(s.dataset_dir), s.source_id) for k, s in splits.items()}
  return data_dir, splits, spec


def test_killed_runs_resume_to_identical_arrays(tmp_path, data):
  data_dir, splits, spec = data
  model, variables = tiny_model(seed=7)
  expected = margins.compute_margins(
    model, variables, splits, settings=SETTINGS, batch_size=8, sidecar_root=tmp_path / 'ref'
  )
  root = tmp_path / 'killed'
  args = dict(
    devices=4, data_dir=str(data_dir), splits=spec, seed=7, root=str(root), out=str(tmp_path / 'o')
  )
  tags = margins.sidecar_tags('margins')

  def complete():
    return {
      key: sorted(
        set(range(s.num_shards))
        - set().union(*(sidecar.missing_shards(s, t, root) for t in tags.values()))
      )
      for key, s in splits.items()
    }

  # Shards run in order real 0-2, generated 0-3 (10 and 11 examples each: 2 batches of 8).
  # 1. Killed after two whole shards.
  proc = _spawn(tmp_path, {**args, 'kill': 'shard:2'})
  (out,) = _finish([proc])
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  assert complete() == {'real': [0, 1], 'generated': []}
  # 2. Killed between the sidecar files of a shard: real shard 2 has 2 of its 3 files.
  proc = _spawn(tmp_path, {**args, 'kill': 'file:2'})
  _finish([proc])
  assert proc.returncode == -signal.SIGKILL
  s = splits['real']
  assert sidecar.sidecar_path(s, tags['iterations'], 2, root).exists()
  assert not sidecar.sidecar_path(s, tags['margin'], 2, root).exists()
  assert complete() == {'real': [0, 1], 'generated': []}
  # 3. Killed in the middle of a shard's batches (generated shard 0, after its first batch).
  proc = _spawn(tmp_path, {**args, 'kill': 'batch:3'})
  _finish([proc])
  assert proc.returncode == -signal.SIGKILL
  assert complete() == {'real': [0, 1, 2], 'generated': []}
  # 4. The rerun does only what is left and ends with the uninterrupted run's arrays.
  proc = _spawn(tmp_path, args)
  (out,) = _finish([proc])
  assert proc.returncode == 0, out[-3000:]
  run = _run_info(out)
  assert run['shards_computed'] == {'real': [], 'generated': [0, 1, 2, 3]}
  got = np.load(tmp_path / 'o.npz')
  for key in splits:
    np.testing.assert_array_equal(got[f'{key}_margin'], expected.margins[key])
    np.testing.assert_array_equal(got[f'{key}_iterations'], expected.iterations[key])
    np.testing.assert_array_equal(
      sidecar.load(splits[key], 'margins', expected.settings, root), expected.margins[key]
    )


def test_two_processes_split_the_shards(tmp_path, data):
  data_dir, splits, spec = data
  model, variables = tiny_model(seed=8)
  # Each process has 2 devices; the same per-device batch here gives the same numbers.
  expected = margins.compute_margins(
    model,
    variables,
    splits,
    settings=SETTINGS,
    batch_size=8,
    mesh=parallel.make_mesh(jax.devices()[:2]),
    sidecar_root=tmp_path / 'ref',
  )
  port = _free_port()
  root = tmp_path / 'shared'
  procs = [
    _spawn(
      tmp_path,
      dict(
        devices=2,
        port=port,
        process_id=pid,
        data_dir=str(data_dir),
        splits=spec,
        seed=8,
        root=str(root),
        out=str(tmp_path / f'out{pid}'),
        summary_dir=str(tmp_path / 'summary'),
      ),
    )
    for pid in (0, 1)
  ]
  outputs = _finish(procs)
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  runs = [_run_info(out) for out in outputs]
  assert [r['process_index'] for r in runs] == [0, 1] and runs[0]['devices'] == 2
  # Shard k belongs to process k mod 2: disjoint sets covering every shard.
  assert runs[0]['shards_computed'] == {'real': [0, 2], 'generated': [0, 2]}
  assert runs[1]['shards_computed'] == {'real': [1], 'generated': [1, 3]}
  # After the barrier, both processes load the complete arrays, equal to one process's.
  for pid in (0, 1):
    got = np.load(tmp_path / f'out{pid}.npz')
    for key in splits:
      np.testing.assert_array_equal(got[f'{key}_margin'], expected.margins[key])
      np.testing.assert_array_equal(got[f'{key}_iterations'], expected.iterations[key])
  summary = json.loads((tmp_path / 'summary' / 'summary.json').read_text())
  assert summary['overall']['count'] == 74 and summary['run']['process_index'] == 0
