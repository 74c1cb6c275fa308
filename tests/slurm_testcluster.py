"""The real single-node SLURM test cluster (pytest plugin). Being built; see docs/cluster-testing.md."""
