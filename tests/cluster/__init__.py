"""The real single-node SLURM test cluster used by the test suite (see docs/cluster-testing.md).

`testcluster.py` is standard-library only, so `scripts/slurm_test_cluster.sh` can run it with any
Python 3; the pytest fixture `slurm_cluster` lives in tests/slurm_testcluster.py.
"""
