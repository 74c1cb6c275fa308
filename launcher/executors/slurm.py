"""The SLURM executor: each job of the plan is one submitit submission (one sbatch call).

An array stage is one ``map_array`` call, i.e. one ``sbatch --array=0-(N-1)%K``, however
many experts there are, up to the cluster's MaxArraySize; past it, several such arrays that
dependencies and status treat as one job (``submit``). The payload is ``StageCommand``, a module-level callable whose only
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
from launcher.sbatch import ArgvFor, SbatchContext, array_parts, submission


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


def _sbatch(sub, job_name: str) -> str:
    """One submitit submission (one sbatch call); its SLURM job id."""
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=sub.folder, python=sub.python)
        executor.update_parameters(**sub.parameters)
        if sub.array:
            return executor.map_array(StageCommand(), sub.task_argvs)[0].job_id.split("_")[0]
        return executor.submit(StageCommand(), sub.task_argvs[0]).job_id
    except Exception as e:  # submitit wraps sbatch failures in various types
        raise BtmError(f"sbatch refused job {job_name!r}: {e}") from e


def submit(jobs: list[Job], profile: Profile, ctx: SbatchContext, argv_for: ArgvFor | None = None) -> list[dict]:
    """Submit the jobs (topologically ordered) with afterok/afterany chains; return the ledger rows.

    ``argv_for(job, unit)``: what unit ``unit`` runs after ``python -m launcher`` (default:
    ``stage RUN_DIR STAGE --unit NAME``; ``btm fewshot`` passes its element commands).

    An array with more units than the cluster's MaxArraySize is submitted as several arrays
    (``launcher.sbatch.array_parts``), one ledger row each (``part``: 0, 1, ...). Its dependents
    wait for all of them (``afterok:ID1:ID2``; ``afterany`` for the collecting stages, so a failed
    task in one part never keeps the others' results from being collected), and ``btm status``
    and ``btm cancel`` read every row."""
    from launcher.scheduler import max_array_size

    if shutil.which("sbatch") is None:  # submitit would fail with a bare RuntimeError
        raise BtmError("sbatch not found on PATH: the slurm executor needs the SLURM client "
                       "commands (sbatch, srun, squeue); run on a login node, or use --executor local")
    run_dir = Path(ctx.run_dir)
    ledger = read_submissions(run_dir)
    limit = max_array_size() if any(job.array and len(job.units) > 1 for job in jobs) else None
    rows = []
    for job in jobs:
        atomic_write_json(RunLayout(run_dir).units_file(job.name), [u.name for u in job.units])
        parts = array_parts(job, limit)
        ids = []
        for k, part in enumerate(parts):
            sub = submission(part, profile, ctx, argv_for)
            ids.append(_sbatch(sub, job.name))
            row = {"job": job.name, "stage": job.stage, "job_id": ids[-1], "array": sub.array,
                   "units": sub.units, "submitted": now(), "executor": "slurm"}
            if len(parts) > 1:
                row["part"] = k
            rows.append(row)
            write_submissions(run_dir, ledger + rows)
        ctx.dependency_ids = {**ctx.dependency_ids, job.name: ":".join(ids)}
        shape = f" (array of {len(job.units)})" if job.array and len(job.units) > 1 else ""
        if len(parts) > 1:
            shape = f" (array of {len(job.units)} in {len(parts)} parts, MaxArraySize {limit})"
        print(f"submitted {job.name}: job {', '.join(ids)}{shape}")
    return rows


def check(jobs: list[Job], profile: Profile, ctx: SbatchContext, argv_for: ArgvFor | None = None) -> list[str]:
    """Validate each job's script with ``sbatch --test-only``; return problems (empty: ok)."""
    import tempfile

    from launcher.scheduler import max_array_size

    problems = []
    limit = max_array_size() if any(job.array and len(job.units) > 1 for job in jobs) else None
    for job in (part for whole in jobs for part in array_parts(whole, limit)):
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
