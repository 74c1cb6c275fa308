"""The preemption contract's trainer side: SIGUSR2/SIGTERM ask for a stop; the loop finishes
the update in flight, saves ``checkpoint_last`` and returns ``preempted=True``.

With several ranks a signal may reach them an update apart, so after every update the ranks
combine their flags (any rank's stop stops all) before deciding, and all stop at the same update.

A signal that reaches a worker before its handler is installed (while it imports torch and
builds the model) is lost: workers start with SIGUSR2 ignored. So the parent of a multi-process
run (fairseq_ext.multiproc) also *records* a stop: it creates the file named by
``$BTM_STOP_FILE``, and a stop is requested once that file exists, whenever the worker got there.
"""
from __future__ import annotations

import os
import signal

STOP_FILE_ENV = "BTM_STOP_FILE"


class StopFlag:
    """While the block runs, SIGUSR2/SIGTERM set ``signum`` instead of ending the process."""

    def __init__(self):
        self.signum = None
        self._old = {}
        self._stop_file = os.environ.get(STOP_FILE_ENV)

    def __enter__(self):
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def requested(self) -> bool:
        if self.signum is None and self._stop_file and os.path.exists(self._stop_file):
            self.signum = signal.SIGUSR2  # the parent got it while this worker could not
        return self.signum is not None


def agree_to_stop(flag: bool, group) -> bool:
    """True on every rank if it is true on any; ``group`` None means a single process."""
    if group is None:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
