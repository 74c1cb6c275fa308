"""The local executor: every unit of every job as a subprocess, at most ``max_workers`` at once.

It runs the same command an sbatch array task runs (``python -m launcher stage RUN_DIR STAGE
--unit NAME``) and honours the same dependencies: ``afterok`` waits for every unit of the
upstream job and cancels the job if one failed (SLURM's ``--kill-on-invalid-dep``),
``afterany`` only waits. A unit exiting with ``PREEMPTED_EXIT`` saved its state and is run
again (a local requeue).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from launcher.contract.errors import PREEMPTED_EXIT
from launcher.contract.layout import RunLayout
from launcher.plan import Job
from launcher.sbatch import REPO_ROOT, stage_argv

MAX_REQUEUES = 3


@dataclass
class UnitRun:
    job: str
    unit: str | None
    returncode: int | None = None  # None: never started (cancelled)
    seconds: float = 0.0
    attempts: int = 0
    log: str = ""


@dataclass
class LocalResult:
    units: list[UnitRun] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def failed(self) -> list[UnitRun]:
        return [u for u in self.units if u.returncode not in (0,)]

    @property
    def compute_seconds(self) -> float:
        return sum(u.seconds for u in self.units)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class LocalExecutor:
    def __init__(self, run_dir: str | Path, max_workers: int | None = None,
                 command_for: Callable[[Job, str | None], list[str]] | None = None,
                 progress: bool = True, poll_s: float = 0.05):
        self.run_dir = Path(run_dir)
        self.max_workers = max(1, min(max_workers or default_workers(), default_workers()))
        self.command_for = command_for or (lambda job, unit: [sys.executable, "-m", "launcher",
                                                               *stage_argv(str(self.run_dir), job, unit)])
        self.progress = progress
        self.poll_s = poll_s

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # Share the cores between concurrent workers instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, default_workers() // self.max_workers)))
        return env

    def run(self, jobs: list[Job]) -> LocalResult:
        """Run the jobs (topologically ordered) to the end; failures do not stop independent work."""
        start = time.perf_counter()
        self.log_dir = RunLayout(self.run_dir).logs
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = self._env()
        self.jobs = {j.name: j for j in jobs}
        self.runs = {(j.name, u.name): UnitRun(j.name, u.name) for j in jobs for u in j.units}
        self.state = {j.name: "waiting" for j in jobs}  # waiting|running|ok|failed|cancelled
        self.remaining = {j.name: len(j.units) for j in jobs}
        self.queue: list[tuple[Job, str | None]] = []
        self.running: dict = {}  # (job, unit) -> (Popen, start time, log file)
        self.bars: dict = {}
        try:
            while self._step():
                self._wait_for_exit()
        finally:
            for proc, _, logf in self.running.values():  # interrupted: stop the units we started
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait()
                logf.close()
            for b in self.bars.values():
                b.close()
        return LocalResult(units=list(self.runs.values()), wall_seconds=time.perf_counter() - start)

    def _wait_for_exit(self) -> None:
        """Sleep until a running unit exits (pidfd, Linux) or poll_s passes."""
        fds = []
        try:
            fds = [os.pidfd_open(proc.pid) for proc, _, _ in self.running.values()]
        except (AttributeError, OSError):
            pass
        if not fds:
            time.sleep(self.poll_s)
            return
        try:
            select.select(fds, [], [], max(self.poll_s, 1.0))
        finally:
            for fd in fds:
                os.close(fd)

    def _settled(self, names: list[str], accept: tuple[str, ...]) -> bool:
        return all(self.state.get(d, "ok") in accept for d in names)  # unknown job: done before

    def _release(self) -> None:
        for job in self.jobs.values():
            if self.state[job.name] != "waiting":
                continue
            if any(self.state.get(d) in ("failed", "cancelled") for d in job.after_ok):
                self.state[job.name] = "cancelled"  # SLURM: --kill-on-invalid-dep=yes
                print(f"btm: {job.name}: cancelled (a dependency failed)", file=sys.stderr)
            elif self._settled(job.after_ok, ("ok",)) and self._settled(job.after_any, ("ok", "failed", "cancelled")):
                self.state[job.name] = "running"
                if self.progress:
                    from tqdm import tqdm

                    self.bars[job.name] = tqdm(total=len(job.units), desc=f"{job.name:<8}", unit="unit",
                                               file=sys.stderr, dynamic_ncols=True)
                self.queue.extend((job, u.name) for u in job.units)

    def _start(self) -> None:
        while self.queue and len(self.running) < self.max_workers:
            job, unit = self.queue.pop(0)
            run = self.runs[(job.name, unit)]
            run.attempts += 1
            run.log = str(self.log_dir / (f"{job.name}.{unit}.log" if unit else f"{job.name}.log"))
            logf = open(run.log, "a")
            proc = subprocess.Popen(self.command_for(job, unit), stdout=logf, stderr=subprocess.STDOUT,
                                    env=self.env, cwd=self.run_dir, start_new_session=True)
            self.running[(job.name, unit)] = (proc, time.perf_counter(), logf)

    def _reap(self) -> None:
        for key, (proc, t0, logf) in list(self.running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            logf.close()
            del self.running[key]
            run = self.runs[key]
            run.seconds += time.perf_counter() - t0
            job = self.jobs[key[0]]
            if rc == PREEMPTED_EXIT and run.attempts <= MAX_REQUEUES:
                self.queue.insert(0, (job, key[1]))  # it saved its state: run it again
                continue
            run.returncode = rc
            if rc != 0:
                print(f"btm: {job.name} {key[1] or ''}: exit {rc}; log: {run.log}", file=sys.stderr)
            if job.name in self.bars:
                self.bars[job.name].update(1)
            self.remaining[job.name] -= 1
            if self.remaining[job.name] == 0:
                ok = all(self.runs[(job.name, u.name)].returncode == 0 for u in job.units)
                self.state[job.name] = "ok" if ok else "failed"
                if job.name in self.bars:
                    self.bars.pop(job.name).close()

    def _step(self) -> bool:
        """One scheduling round; False when nothing is left to run."""
        self._reap()
        self._release()
        self._start()
        return bool(self.running or self.queue)
