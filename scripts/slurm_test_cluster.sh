#!/usr/bin/env bash
# Start, stop or inspect a SLURM test cluster by hand (as root); the test suite starts its own.
# What runs, ports and env vars: docs/cluster-testing.md.
#
#   eval "$(scripts/slurm_test_cluster.sh start "$HOME/slurm1")"   # starts it, exports SLURM_CONF
#   scripts/slurm_test_cluster.sh status "$HOME/slurm1"            # daemons, ports, sinfo (exit 1 if down)
#   scripts/slurm_test_cluster.sh stop "$HOME/slurm1"              # cancels jobs, stops every daemon
#
# DIR must be new, empty or hold a stopped cluster. Missing Debian packages are installed
# (apt-get) on the first start. BTM_PYTHON picks the interpreter (default python3; stdlib only).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -ne 2 ]; then
  echo "usage: $0 start|stop|status DIR" >&2
  exit 2
fi
exec "${BTM_PYTHON:-python3}" "$repo/tests/cluster/testcluster.py" "$@"
