"""How many CPU threads a stage process may use, from the CPUs SLURM gave its job.

Under SLURM nothing else sizes them: torch and OpenMP default to every core of the node, so two
1-CPU jobs on one host each start a full thread pool and fight over the cores (a seed stage
ran 3-4x slower than under the local executor, which shares the cores between its workers, see
``launcher/executors/local.py``). ``python -m launcher stage`` calls ``apply_slurm_threads``
before anything imports torch, so the intra-op pool torch builds at import has this size; the
processes it starts (torchrun workers) inherit the variable.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from launcher.contract.errors import BtmError

THREAD_VARS = ("OMP_NUM_THREADS",)  # torch's intra-op pool and OpenMP both read it at start


def slurm_thread_env(environ: Mapping[str, str], nproc: int = 1) -> dict[str, str]:
    """The thread variables to add to ``environ``: {} outside SLURM or when the user set them.

    ``nproc`` processes of this task (torchrun workers) share the task's CPUs. A value the user
    exported wins, as it does under the local executor.
    """
    raw = environ.get("SLURM_CPUS_PER_TASK")
    if raw is None:
        return {}
    try:
        cpus = int(raw)
    except ValueError:
        raise BtmError(f"SLURM_CPUS_PER_TASK={raw!r} is not a number of CPUs") from None
    if cpus < 1:
        raise BtmError(f"SLURM_CPUS_PER_TASK={raw!r} must be at least 1")
    threads = str(max(1, cpus // max(1, nproc)))
    return {var: threads for var in THREAD_VARS if var not in environ}


def apply_slurm_threads(nproc: int = 1) -> dict[str, str]:
    """Set this process's thread variables from its SLURM allocation; return what was set."""
    updates = slurm_thread_env(os.environ, nproc)
    os.environ.update(updates)
    return updates
