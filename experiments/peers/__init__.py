"""puma_jax's PyTorch peers (docs/peers.md).

The modules here run in two interpreters. `export.py` and this file run with puma_jax
(JAX); every other module runs in the peer virtualenv (torch, torchattacks, foolbox and
the original AutoAttack), built by `bash experiments/peers/setup_venv.sh`, and is started
as a worker script by experiments/bench_attacks.py and experiments/bench_eval.py.
"""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def venv_dir() -> Path:
  """The peer virtualenv: $PUMA_PEERS_VENV, else .peers/venv in the repository."""
  return Path(os.environ.get('PUMA_PEERS_VENV') or REPO / '.peers' / 'venv')


def python() -> Path:
  """The peer virtualenv's interpreter (it may not exist: check before use)."""
  return venv_dir() / 'bin' / 'python'


def missing_venv_message(path: Path) -> str:
  """What to do when the peer interpreter `path` does not exist."""
  return (
    f'no peer virtualenv at {path}: build it with `bash experiments/peers/setup_venv.sh` '
    '(into $PUMA_PEERS_VENV, else .peers/venv; see docs/peers.md)'
  )
