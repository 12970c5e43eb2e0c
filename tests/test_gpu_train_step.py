"""Smoke test of experiments/gpu_train_step.py on the CPU (--tiny) and its no-GPU exit."""

import json

import jax
import numpy as np
import pytest

from experiments import gpu_train_step


@pytest.fixture
def fast_compile():
  """XLA with most optimisations off: the smoke test checks the script, not the timing."""
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


def test_tiny_run_times_the_training_step(tmp_path, capsys, fast_compile):
  out = tmp_path / 'result.json'
  result = gpu_train_step.main(['--tiny', '--steps', '2', '--out', str(out)])
  assert result['model'].startswith('WRN-10-1 (swish), bfloat16 compute')
  assert (result['loss'], result['batch_size'], result['attack_steps']) == ('trades', 8, 2)
  assert len(result['step_s']) == 2 and min(result['step_s']) > 0
  assert result['examples_per_s'] == pytest.approx(8 / np.median(result['step_s']))
  assert np.isfinite(result['last_metrics']['loss'])
  # Two warm-up steps and two timed ones, from step 0 of a fresh state.
  assert result['last_metrics']['learning_rate'] > 0
  assert result['compiled_memory_bytes']['temp'] > 0
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  printed = capsys.readouterr().out
  assert f'{result["examples_per_s"]:.1f} examples/s' in printed
  assert 'peak memory in use' in printed


def test_without_a_gpu_it_says_so_and_measures_nothing(capsys):
  with pytest.raises(SystemExit) as exit_info:
    gpu_train_step.main([])  # the tests pin JAX to the CPU
  assert exit_info.value.code == gpu_train_step.NO_GPU_EXIT_CODE
  err = capsys.readouterr().err
  assert 'No GPU here' in err and '--tiny' in err
