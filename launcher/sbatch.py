"""sbatch parameters and scripts for one job of the plan.

``slurm_parameters`` is the single source of a job's SLURM settings: the SLURM executor hands it
to submitit, and ``render_sbatch`` (pure: job + profile -> script text) renders the same
settings with our own stage command, for ``--dry-run``, ``--check`` (``sbatch --test-only``)
and people who want to submit by hand. Every value that reaches the shell goes through
``shlex.quote`` (submitit quotes ``#SBATCH`` values the same way).

Preemption: ``--requeue`` and ``--signal=B:USR2@<grace>``. The ``B:`` sends the signal to the
batch shell only, so the command is ``exec``-ed to *be* that shell; the stage saves
checkpoint_last on SIGUSR2 and exits with PREEMPTED_EXIT, and the job is requeued.

Several GPUs in one task: a training stage's command carries ``--nproc-per-node N`` (N = the
job's GPUs per node), and the stage runs the trainer under ``torchrun --standalone`` on that
node (fairseq_ext/multiproc.py). A job never runs one process group across nodes.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.plan import Job
from launcher.profiles import Profile
from launcher.stages import TRAINING_STAGES  # the stages that run fairseq_ext.train

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout whose `launcher` runs on the nodes


@dataclass
class SbatchContext:
    """What a job needs besides itself and the profile: where, which run, which upstream ids."""
    run_dir: str
    run_name: str
    array_parallelism: int = 8
    dependency_ids: dict[str, str] = field(default_factory=dict)  # job name -> SLURM job id
    python: str | None = None  # default: profile.python, else this interpreter
    pythonpath: str | None = None  # default: this checkout (so the nodes run the same code)


def units_file(run_dir: str | Path, job: Job) -> Path:
    return Path(run_dir) / "jobs" / f"{job.name}.units.json"


def dependency_string(job: Job, ids: dict[str, str]) -> str | None:
    parts = []
    for kind, names in (("afterok", job.after_ok), ("afterany", job.after_any)):
        got = [ids.get(n, f"<{n}>") for n in names]
        if got:
            parts.append(kind + ":" + ":".join(got))
    return ",".join(parts) or None  # ',' = all of them must hold


def slurm_parameters(job: Job, profile: Profile, ctx: SbatchContext) -> dict:
    """submitit SlurmExecutor parameters (also the input of ``render_sbatch``)."""
    params: dict = {
        "job_name": f"{ctx.run_name}.{job.name}",
        "nodes": job.nodes,
        "cpus_per_task": job.cpus_per_task,
        "time": job.time,
        "signal_delay_s": profile.signal_grace_s,
        "use_srun": False,
        "stderr_to_stdout": True,
        "wckey": "btm",
        "setup": [f"export PYTHONPATH={shlex.quote(ctx.pythonpath or str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    if job.gpus_per_node:
        params["gpus_per_node"] = job.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(profile, key)
        if value:
            params[key] = value
    if job.mem:
        params["mem"] = job.mem
    if job.array:
        params["array_parallelism"] = ctx.array_parallelism
    extra: dict = {
        "requeue": True,
        "signal": f"B:USR2@{profile.signal_grace_s}",
        "kill_on_invalid_dep": "yes",
    }
    dep = dependency_string(job, ctx.dependency_ids)
    if dep:
        extra["dependency"] = dep
    for line in profile.extra_sbatch:
        key, _, value = line[2:].partition("=")
        extra[key.replace("-", "_")] = value if value else True
    params["additional_parameters"] = extra
    return params


def stage_argv(run_dir: str, job: Job, unit: str | None = None) -> list[str]:
    """``stage RUN_DIR STAGE ...`` (after ``python -m launcher``) for one unit or an array task."""
    argv = ["stage", str(run_dir), job.stage]
    if unit is not None:
        argv += ["--unit", unit]
    elif job.array:
        argv += ["--units-file", str(units_file(run_dir, job))]  # index from SLURM_ARRAY_TASK_ID
    elif job.units and job.units[0].name is not None:
        argv += ["--unit", job.units[0].name]
    if job.stage in TRAINING_STAGES and job.gpus_per_node > 1:
        argv += ["--nproc-per-node", str(job.gpus_per_node)]  # torchrun over this node's GPUs
    return argv


def python_command(profile: Profile, ctx: SbatchContext) -> str:
    return ctx.python or profile.python or sys.executable


def render_sbatch(job: Job, profile: Profile, ctx: SbatchContext, argv: list[str] | None = None) -> str:
    """The sbatch script of one job (an array job for array stages). ``argv``: what follows
    ``python -m launcher`` (default: the stage command, ``stage_argv``)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = slurm_parameters(job, profile, ctx)
    argv = [python_command(profile, ctx), "-u", "-m", "launcher", *(argv or stage_argv(ctx.run_dir, job))]
    command = "exec " + " ".join(shlex.quote(a) for a in argv)
    folder = Path(ctx.run_dir) / "jobs" / "logs"
    map_count = len(job.units) if job.array else None
    text = _make_sbatch_string(command=command, folder=folder, map_count=map_count, **params)
    # submitit marks its own jobs; ours run `python -m launcher stage`, not submitit's runner.
    return text.replace("export SUBMITIT_EXECUTOR=slurm\n", "")
