"""Every test runs with 4 emulated CPU devices, so sharded code paths run everywhere."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_num_cpu_devices', 4)
# Many tests compile the same programs (the same model and attack in several
# stages); XLA's persistent cache lets them share compilations within a run.
jax.config.update(
  'jax_compilation_cache_dir',
  os.environ.get('PUMA_JAX_TEST_COMPILATION_CACHE', '/tmp/puma_jax_test_compilation_cache'),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@pytest.fixture(scope='session', autouse=True)
def _four_devices():
  assert jax.device_count() == 4, jax.devices()


@pytest.fixture
def fast_compile():
  """XLA with most optimisations off: for smoke tests that check a script, not its timing."""
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', before)
