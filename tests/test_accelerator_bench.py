"""Smoke test of experiments/accelerator_bench.py on the CPU (--tiny)."""

import json

import jax
import numpy as np
import pytest

from experiments import accelerator_bench
from puma_jax import utilization


def test_tiny_run_times_the_programs_with_mfu(tmp_path, capsys, fast_compile, monkeypatch):
  monkeypatch.setattr(utilization, 'peak_flops', lambda kind: 1e12)  # the CPU has no entry
  out = tmp_path / 'result.json'
  argv = ['--tiny', '--programs', 'trades_step,margins', '--dtypes', 'float32']
  result = accelerator_bench.main([*argv, '--repeats', '2', '--margin-dtypes', '--out', str(out)])
  assert result['model'] == 'WRN-10-1 (swish)' and result['num_devices'] == jax.device_count()
  assert set(result['timings']) == {'trades_step float32', 'margins float32'}
  step = result['timings']['trades_step float32']
  assert len(step['run_s']) == 2 and step['examples'] == 8
  assert step['examples_per_s'] == pytest.approx(8 / np.median(step['run_s']))
  passes = utilization.train_step_passes('trades', 2)
  assert step['model_flops'] > passes * 8 * 2 * (32 * 32 * 27 * 16)  # more than the stem conv
  want_mfu = step['model_flops'] / (step['run_s_median'] * result['num_devices'] * 1e12)
  assert step['mfu'] == pytest.approx(want_mfu)
  assert 'mfu' not in result['timings']['margins float32']
  d = result['margin_dtypes']
  assert d['examples'] == 8 and 0 <= d['relative_difference_median'] < 0.1
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  printed = capsys.readouterr().out
  assert f'MFU {100 * step["mfu"]:.1f}%' in printed and 'DeepFool margins bf16 vs f32' in printed
