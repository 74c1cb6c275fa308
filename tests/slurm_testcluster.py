"""pytest plugin: the real single-node SLURM test cluster (fixture `slurm_cluster`).

Loaded by tests/conftest.py (`pytest_plugins = ["slurm_testcluster"]`). The cluster itself is
tests/cluster/testcluster.py (stdlib only); docs/cluster-testing.md describes what runs.

    def test_something(slurm_cluster):
        slurm_cluster.run(["sbatch", "--wrap", "true"])   # client commands with cluster.env
        subprocess.run(["sinfo"])                          # SLURM_CONF is in os.environ too

The fixture is session-scoped: the first test that asks for it starts the cluster (installing
the Debian packages once when they are missing), the end of the session stops it. While it is
up, os.environ holds `cluster.env` (SLURM_CONF), so submitit and `btm` find it. A test that
disturbs it (kill_slurmd, restart_slurmctld) must leave it idle again (`cluster.wait_idle()`).
If it cannot start (not root, no packages, a daemon fails), tests using it skip, or fail under
CI=true (`conftest.require`). BTM_SLURM_CLUSTER=off does not start it (same skip/fail rule);
BTM_KEEP_SLURM_CLUSTER=1 keeps its directory (logs) after the session.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cluster.testcluster import (TERMINAL_STATES, ClusterError, ClusterUnavailable,
                                 SlurmTestCluster)

__all__ = ["SlurmTestCluster", "ClusterError", "ClusterUnavailable", "TERMINAL_STATES",
           "new_cluster_root"]


def new_cluster_root() -> Path:
    """A fresh, short directory the mysql user can traverse (pytest's tmp dirs are 0700)."""
    return Path(tempfile.mkdtemp(prefix="btm-slurm-"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started SlurmTestCluster with its env exported into os.environ for the session."""
    from conftest import require

    if os.environ.get("BTM_SLURM_CLUSTER", "").lower() in ("0", "off", "no", "false"):
        require(False, "the SLURM test cluster is switched off (BTM_SLURM_CLUSTER=off)")
    root = new_cluster_root()
    cluster = SlurmTestCluster(root)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        require(False, str(exc))
    except ClusterError as exc:
        require(False, f"the SLURM test cluster did not start (logs kept in {root}): {exc}")
    env = pytest.MonkeyPatch()
    for key, value in cluster.env.items():
        env.setenv(key, value)
    try:
        yield cluster
    finally:
        env.undo()
        cluster.stop()
        if not os.environ.get("BTM_KEEP_SLURM_CLUSTER"):
            shutil.rmtree(root, ignore_errors=True)
