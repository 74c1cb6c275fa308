"""``RUN_DIR/run.lock``: one planning/submitting ``btm run`` per run directory at a time."""
from __future__ import annotations

import contextlib
from pathlib import Path

from launcher.contract.errors import BtmError
from launcher.contract.layout import RunLayout


@contextlib.contextmanager
def run_lock(run_dir: str | Path):
    """Hold the run directory's lock, or raise BtmError at once if another process holds it."""
    from filelock import FileLock, Timeout

    layout = RunLayout(run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(layout.lock), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise BtmError(f"another btm process is running {run_dir} (it holds {layout.lock}); "
                       "wait for it, or check with `btm status`") from None
    try:
        yield
    finally:
        lock.release()
