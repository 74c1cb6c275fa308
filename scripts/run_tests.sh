#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent, seconds when done before) and run the
# whole test suite. Extra arguments go to pytest. The SLURM test cluster is started (and its
# Debian packages installed when missing) by the tests themselves: see tests/cluster/.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh" --test
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest "$@"
