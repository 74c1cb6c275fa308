"""The SLURM executor: each job of the plan is one submitit submission (one sbatch call).

An array stage is one ``map_array`` call, i.e. one ``sbatch --array=0-(N-1)%K``, however
many experts there are. The payload is ``StageCommand``, a module-level callable whose only
argument is an argv list (``stage RUN_DIR STAGE --unit NAME``): each task's unit is chosen by
name at submit time and pickled with it, never derived from the task id on the node
(``jobs/<job>.units.json`` lists them in array-index order for people). What is submitted, the
script included, is ``launcher.sbatch.submission``; job ids go to the ledger (launcher/ledger.py).

Preemption: jobs get ``--requeue --signal=B:USR2@<grace>``; the batch shell *is* submitit's
runner (``exec python``), whose handler calls ``StageCommand.checkpoint``: it forwards SIGUSR2
to the stage process, waits for it to save checkpoint_last and exit, and returns a resubmission;
submitit then requeues the job and the stage resumes from its checkpoint.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission

from launcher.contract.atomic import atomic_write_json
from launcher.contract.errors import PREEMPTED_EXIT, BtmError
from launcher.contract.layout import RunLayout
from launcher.ledger import read_submissions, submitted_job_ids, write_submissions
from launcher.plan import Job
from launcher.profiles import Profile
from launcher.records import now
from launcher.sbatch import ArgvFor, SbatchContext, submission


class StagePreempted(RuntimeError):
    """The stage saved its state and exited with PREEMPTED_EXIT; SLURM requeues the job."""


class StageCommand(Checkpointable):
    """Runs ``python -m launcher <argv>`` in a child process (the submitit payload)."""

    grace_s = 600  # upper bound on waiting for the child to save after SIGUSR2

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

    def __call__(self, argv: list[str]) -> int:
        self._proc = subprocess.Popen([sys.executable, "-u", "-m", "launcher", *argv])
        rc = self._proc.wait()
        if rc == PREEMPTED_EXIT:
            raise StagePreempted(f"stage {' '.join(argv)} saved its state and asked to be requeued")
        if rc != 0:
            raise RuntimeError(f"stage {' '.join(argv)} failed with exit status {rc}")
        return rc

    def checkpoint(self, argv: list[str]) -> DelayedSubmission:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR2)  # the trainer finishes its update and saves
            try:
                proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        return DelayedSubmission(StageCommand(), argv)

    def __getstate__(self):  # never pickle a live process
        return {}

    def __setstate__(self, state):
        self._proc = None


def submit(jobs: list[Job], profile: Profile, ctx: SbatchContext, argv_for: ArgvFor | None = None) -> list[dict]:
    """Submit the jobs (topologically ordered) with afterok/afterany chains; return the ledger rows.

    ``argv_for(job, unit)``: what unit ``unit`` runs after ``python -m launcher`` (default:
    ``stage RUN_DIR STAGE --unit NAME``; ``btm fewshot`` passes its element commands)."""
    import submitit

    if shutil.which("sbatch") is None:  # submitit would fail with a bare RuntimeError
        raise BtmError("sbatch not found on PATH: the slurm executor needs the SLURM client "
                       "commands (sbatch, srun, squeue); run on a login node, or use --executor local")
    run_dir = Path(ctx.run_dir)
    ledger = read_submissions(run_dir)
    rows = []
    for job in jobs:
        sub = submission(job, profile, ctx, argv_for)
        atomic_write_json(RunLayout(run_dir).units_file(job.name), sub.units)
        try:
            executor = submitit.SlurmExecutor(folder=sub.folder, python=sub.python)
            executor.update_parameters(**sub.parameters)
            if sub.array:
                job_id = executor.map_array(StageCommand(), sub.task_argvs)[0].job_id.split("_")[0]
            else:
                job_id = executor.submit(StageCommand(), sub.task_argvs[0]).job_id
        except Exception as e:  # submitit wraps sbatch failures in various types
            raise BtmError(f"sbatch refused job {job.name!r}: {e}") from e
        ctx.dependency_ids = {**ctx.dependency_ids, job.name: job_id}
        row = {"job": job.name, "stage": job.stage, "job_id": job_id, "array": sub.array,
               "units": sub.units, "submitted": now(), "executor": "slurm"}
        rows.append(row)
        write_submissions(run_dir, ledger + rows)
        print(f"submitted {job.name}: job {job_id}" + (f" (array of {len(sub.units)})" if sub.array else ""))
    return rows


def check(jobs: list[Job], profile: Profile, ctx: SbatchContext, argv_for: ArgvFor | None = None) -> list[str]:
    """Validate each job's script with ``sbatch --test-only``; return problems (empty: ok)."""
    import tempfile

    problems = []
    for job in jobs:
        # Dependencies name jobs that do not exist yet; SLURM would reject them, so leave them out.
        test_job = Job(**{**job.__dict__, "after_ok": [], "after_any": []})
        text = submission(test_job, profile, ctx, argv_for).script
        with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
            f.write(text)
        try:
            out = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
        except OSError as e:
            raise BtmError(f"cannot run sbatch for --check: {e}") from None
        finally:
            Path(f.name).unlink(missing_ok=True)
        if out.returncode != 0:
            problems.append(f"{job.name}: {out.stderr.strip() or out.stdout.strip()}")
        else:
            print(f"{job.name}: ok ({(out.stderr or out.stdout).strip()})")
    return problems


def cancel(run_dir: str | Path) -> list[str]:
    ids = submitted_job_ids(run_dir)
    if ids:
        try:
            subprocess.run(["scancel", *ids], check=False, timeout=60)
        except OSError as e:
            raise BtmError(f"cannot run scancel: {e}") from None
    return ids


def active_jobs(run_dir: str | Path) -> list[str]:
    """Submitted jobs of this run still pending or running (per squeue)."""
    from launcher.scheduler import active_job_ids

    return active_job_ids(submitted_job_ids(run_dir))
