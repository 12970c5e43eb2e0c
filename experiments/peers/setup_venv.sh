#!/usr/bin/env bash
# Builds the virtualenv of puma_jax's PyTorch peers (docs/peers.md): torch, torchattacks,
# foolbox and the original AutoAttack (fra31/auto-attack), all pinned.
#
# Usage: bash experiments/peers/setup_venv.sh [DIR]
#   DIR             where the virtualenv goes; default $PUMA_PEERS_VENV, else .peers/venv in the
#                   repository (git-ignored). The tests and experiments find it the same way.
#   AUTOATTACK_SRC  a local checkout of https://github.com/fra31/auto-attack to install from;
#                   unset: pip installs it from GitHub at the pinned commit below.
#   PYTHON          the interpreter that creates the virtualenv (default python3, >= 3.10).
# A build that fails removes the directory it created, so a half-built virtualenv is never used.
set -euo pipefail

AUTOATTACK_COMMIT=a39220048b3c9f2cca9a4d3a54604793c68eca7e  # fra31/auto-attack master, 2023-01-09

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
V=${1:-${PUMA_PEERS_VENV:-$REPO/.peers/venv}}
PY=${PYTHON:-python3}
REQ="$HERE/requirements.txt"

if [ -e "$V" ]; then
  echo "setup_venv.sh: $V already exists; remove it first (rm -r '$V') or name another DIR" >&2
  exit 2
fi
if [ -n "${AUTOATTACK_SRC:-}" ] && [ ! -f "$AUTOATTACK_SRC/autoattack/autoattack.py" ]; then
  echo "setup_venv.sh: AUTOATTACK_SRC=$AUTOATTACK_SRC is not a checkout of fra31/auto-attack" \
    "(no autoattack/autoattack.py); clone https://github.com/fra31/auto-attack there or unset it" >&2
  exit 2
fi

trap 'echo "setup_venv.sh: failed; removing $V" >&2; rm -rf "$V"' ERR
mkdir -p "$(dirname "$V")"
"$PY" -m venv "$V"
PIP=("$V/bin/python" -m pip install --disable-pip-version-check)

# torch and the runtime dependencies of the packages below, with their own dependencies.
"${PIP[@]}" -r <(grep -v -- '^[^#].*# no-deps' "$REQ")
# torchattacks, foolbox, eagerpy without dependencies (they would pull another torch).
"${PIP[@]}" --no-deps -r <(grep -- '^[^#].*# no-deps' "$REQ" | sed 's/#.*//')
# The original AutoAttack (no dependencies besides torch and numpy).
if [ -n "${AUTOATTACK_SRC:-}" ]; then
  "${PIP[@]}" --no-deps "$AUTOATTACK_SRC"
else
  "${PIP[@]}" --no-deps "git+https://github.com/fra31/auto-attack@$AUTOATTACK_COMMIT"
fi

"$V/bin/python" - <<'PY'
import autoattack, foolbox, torch, torchattacks
print(f'peer virtualenv ready: torch {torch.__version__}, torchattacks {torchattacks.__version__}, '
      f'foolbox {foolbox.__version__}, autoattack from {autoattack.__file__}')
PY
trap - ERR
echo "python: $V/bin/python"
