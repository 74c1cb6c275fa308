"""Executors: run a plan locally (subprocesses) or on SLURM (submitit)."""
