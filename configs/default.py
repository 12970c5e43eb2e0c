"""The embedded default: MNIST real + generated data, small CNN, L-infinity.

Runs the whole PUMA pipeline offline on a 2-core CPU:

  python -m puma_jax.main --config=configs/default.py --workdir=/tmp/puma_default

Variants (`--config=configs/default.py:tiny`):
  tiny: seconds-long end-to-end run used by the tests.
"""

import ml_collections

from puma_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.get_base_config()
  if arg == 'tiny':
    config_base.shrink_for_tests(c)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} of configs/default.py; known: tiny')
  return c
