"""Locks of a run directory: ``run.lock`` (one planning/submitting ``btm run`` at a time) and
``locks/<stage>.<unit>.lock`` (one process per unit: a re-run after a SIGKILLed ``btm run``, or
a requeued task next to a zombie, finds the unit busy instead of racing it on the same files).

Both are flock locks (filelock): the kernel releases them when the holder dies, however it dies.
"""
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


def _unit_label(stage: str, unit: str | None) -> str:
    return f"{stage} {unit}" if unit else stage


@contextlib.contextmanager
def unit_lock(run_dir: str | Path, stage: str, unit: str | None):
    """Hold one unit's lock while it runs, or raise BtmError at once naming the unit."""
    from filelock import FileLock, Timeout

    path = RunLayout(run_dir).unit_lock(stage, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise BtmError(f"{_unit_label(stage, unit)} of {run_dir} is already running in another process "
                       f"(it holds {path}); wait for it to end, or stop it (`fuser {path}` names it)") from None
    try:
        yield
    finally:
        lock.release()


def refuse_running_units(run_dir: str | Path, units: list[tuple[str, str | None]]) -> None:
    """Before starting units: BtmError naming every one that a live process still runs."""
    from filelock import FileLock, Timeout

    layout, busy = RunLayout(run_dir), []
    for stage, unit in units:
        path = layout.unit_lock(stage, unit)
        if not path.exists():
            continue
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            busy.append(_unit_label(stage, unit))
            continue
        lock.release()
    if busy:
        raise BtmError(f"{', '.join(busy)} of {run_dir} still running in another process (a `btm run` "
                       f"that was killed left it?); wait for it to end or stop it (`fuser "
                       f"{layout.root / 'locks'}/*.lock` names them), then run again")
