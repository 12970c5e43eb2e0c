"""Peak FLOP/s table, MFU arithmetic, model FLOPs of a step, and the train loop's throughput log."""

import itertools
import logging
import types

import jax
import numpy as np
import pytest

from configs import default
from puma_jax import datasets, models, train, utilization


@pytest.mark.parametrize(
  'kind, tflops',
  [
    ('NVIDIA H100 80GB HBM3', 989),  # SXM
    ('NVIDIA H100 PCIe', 756),
    ('NVIDIA A100-SXM4-80GB', 312),
    ('NVIDIA A100-PCIE-40GB', 312),
    ('TPU v4', 275),
    ('TPU v5 lite', 197),
    ('TPU v5e', 197),
    ('TPU v5p', 459),
    ('TPU v5', 459),
    ('TPU v6 lite', 918),
    ('TPU v6e', 918),
  ],
)
def test_peak_table(kind, tflops):
  assert utilization.peak_flops(kind) == tflops * 1e12


@pytest.mark.parametrize('kind', ['cpu', 'NVIDIA H100 NVL', 'NVIDIA H200', 'TPU v3', 'TPU v5x'])
def test_other_device_kinds_are_unknown(kind):
  assert utilization.peak_flops(kind) is None


def test_mfu_arithmetic():
  # 1 PFLOP per step in 2 s on 4 devices of 250 TFLOP/s: 125 TFLOP/s each, half the peak.
  assert utilization.mfu(1e15, 2.0, 4, 250e12) == pytest.approx(0.5)
  assert utilization.mfu(1e15, 1.0, 4, 250e12) == pytest.approx(1.0)
  assert utilization.mfu(1e15, 2.0, 4, None) is None
  with pytest.raises(ValueError, match='step_seconds'):
    utilization.mfu(1e15, 0.0, 4, 250e12)


def test_train_step_passes():
  # TRADES: clean logits 1 + 10 attack steps x (forward + input gradient) + 2 x (fwd + bwd).
  assert utilization.train_step_passes('trades', 10) == 1 + 10 * 2 + 2 * 3
  # PGD-AT: 10 x 2 + one training pass (fwd + bwd) + the metrics' clean logits.
  assert utilization.train_step_passes('pgd_at', 10) == 10 * 2 + 3 + 1
  with pytest.raises(ValueError, match='train.loss'):
    utilization.train_step_passes('mart', 10)


def test_forward_flops_count_the_convs_and_matmuls():
  model = models.create(
    'small_cnn', num_classes=10, conv_channels=(8, 16), pool_after=(1, 1), dense_widths=(32,)
  )
  batch, shape = 4, (16, 16, 3)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, *shape), np.float32))
  )
  got = utilization.forward_flops(model, variables, shape, batch)
  # Multiply-adds x 2: conv 3x3 3->8 on 16x16, conv 3x3 8->16 on 8x8, dense 256->32, 32->10.
  # XLA counts the taps that fall inside the image: 3n - 2 of the 3n per row of n outputs.
  taps = lambda n: (3 * n - 2) ** 2
  macs = taps(16) * 3 * 8 + taps(8) * 8 * 16 + 4 * 4 * 16 * 32 + 32 * 10
  want = 2 * batch * macs
  assert want <= got <= 1.1 * want  # plus the elementwise ops (bias, ReLU, pooling)


def test_step_meter_rates(monkeypatch):
  clock = itertools.chain([10.0, 14.0], itertools.repeat(20.0))
  monkeypatch.setattr(utilization, 'time', types.SimpleNamespace(perf_counter=lambda: next(clock)))
  meter = utilization.StepMeter(
    examples_per_step=512, num_devices=2, flops_per_step=8e15, peak=1e15
  )
  meter.start()  # 10.0
  for _ in range(4):
    meter.step()
  rates = meter.read()  # 14.0: 4 steps in 4 s
  assert rates['step_s'] == pytest.approx(1.0)
  assert rates['examples_per_s_per_device'] == pytest.approx(256.0)
  assert rates['mfu'] == pytest.approx(8e15 / (1.0 * 2 * 1e15))
  assert meter.read() is None  # an empty window restarts the meter
  no_flops = utilization.StepMeter(512, 2, None, 1e15)
  no_flops.start()  # 20.0
  no_flops._t0 = 19.0
  no_flops.step()
  assert 'mfu' not in no_flops.read()  # 20.0 - 19.0: one step, no FLOP count, no MFU


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  config = default.get_config('tiny')
  return datasets.prepare(config.data, tmp_path_factory.mktemp('data'))


def test_train_loop_logs_examples_per_second_and_mfu(prepared, tmp_path, monkeypatch, caplog):
  config = default.get_config('tiny')
  config.attack.num_steps = 1
  config.eval.pgd_steps = 1
  config.train.log_every_steps = 2
  calls = []

  def fake_peak(kind):  # the CPU has no entry; pretend it has one
    calls.append(kind)
    return 1e12

  monkeypatch.setattr(train.utilization, 'peak_flops', fake_peak)
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(config, tmp_path / 'run', prepared=prepared, num_steps=4)
  assert calls == [jax.devices()[0].device_kind]
  progress = [r.getMessage() for r in caplog.records if 'examples/s per device' in r.getMessage()]
  assert len(progress) == 2 and all('MFU' in m for m in progress)  # after steps 2 and 4
  rows = [line for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert rows and not any('mfu' in r or 'examples_per_s' in r for r in rows)


def test_xla_cost_analysis_counts_a_loop_body_once():
  """Why step FLOPs are F x passes: the compiled step's cost analysis ignores trip counts.

  If this fails, XLA counts loops properly and the compiled train step's own cost analysis
  can replace `train_step_passes`.
  """
  x = jax.numpy.ones((64, 64))

  def flops(n):
    loop = jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda i, a: jax.numpy.tanh(a @ x), x))
    cost = loop.lower(x).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost)['flops']

  assert flops(10) < 2 * flops(2)  # ten matmuls counted like two (one loop body)
