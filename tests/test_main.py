"""The command line's own logic (the pipeline itself is tested in test_pipeline.py)."""

import pytest

from puma_jax import main


@pytest.mark.parametrize(
  'cores, devices', [(1, 1), (2, 2), (3, 2), (4, 4), (6, 4), (8, 8), (16, 8), (96, 8)]
)
def test_auto_cpu_devices_is_a_power_of_two_within_the_cores(cores, devices):
  assert main.auto_cpu_devices(cores) == devices


def test_default_batch_sizes_divide_over_auto_cpu_devices():
  from configs import default

  config = default.get_config()
  for batch in (config.train.batch_size, config.margins.batch_size, config.eval.batch_size):
    assert batch % main.MAX_AUTO_CPU_DEVICES == 0
