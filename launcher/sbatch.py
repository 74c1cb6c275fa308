"""What the SLURM executor submits for one job of the plan, as one pure function.

``submission(job, profile, ctx)`` gives everything one sbatch call is made of: the submitit
parameters (``slurm_parameters``), the argv each task's pickled ``StageCommand`` runs after
``python -m launcher`` (``stage RUN_DIR STAGE --unit NAME``, one per array task), and the exact
script text submitit writes and hands to sbatch. The executor submits from it
(launcher/executors/slurm.py), ``--check`` (``sbatch --test-only``) and ``btm fewshot run
--dry-run`` show its script, and the golden files in tests/golden/ are its output; a test on
the real test cluster checks that the script submitit wrote is this text. Every value that
reaches the shell goes through ``shlex.quote`` (submitit quotes ``#SBATCH`` values the same way).

Preemption: ``--requeue`` and ``--signal=B:USR2@<grace>``. The ``B:`` sends the signal to the
batch shell only, so submitit's runner is ``exec``-ed to *be* that shell; its handler asks the
``StageCommand`` to forward SIGUSR2 to the stage, which saves checkpoint_last and exits with
PREEMPTED_EXIT, and the job is requeued.

Several GPUs in one task: a training stage's command carries ``--nproc-per-node N`` (N = the
job's GPUs per node), and the stage runs the trainer under ``torchrun --standalone`` on that
node (fairseq_ext/multiproc.py). Several nodes (``#SBATCH --nodes=M``, one task per node): the
command also carries ``--nodes M``; the stage, in the batch shell on the first node, starts one
``srun`` step of M x N ranks (fairseq_ext/multinode.py; ``launch_line`` in launcher/plan.py
shows it) and the script exports ``BTM_COLLECTIVE_TIMEOUT_S`` from the profile.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from launcher.contract.layout import RunLayout
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


def dependency_string(job: Job, ids: dict[str, str]) -> str | None:
    """``afterok:ID[:ID...],afterany:...``; a job submitted as several arrays has all its ids
    (``"101:102"``), so its dependents wait for every part."""
    parts = []
    for kind, names in (("afterok", job.after_ok), ("afterany", job.after_any)):
        got = [ids.get(n, f"<{n}>") for n in names]
        if got:
            parts.append(kind + ":" + ":".join(got))
    return ",".join(parts) or None  # ',' = all of them must hold


def slurm_parameters(job: Job, profile: Profile, ctx: SbatchContext) -> dict:
    """submitit SlurmExecutor parameters of the job (``Submission.parameters``)."""
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
    if job.nodes > 1:  # the ranks' collectives fail within this, never hang (fairseq_ext/training/setup.py)
        params["setup"].append(f"export BTM_COLLECTIVE_TIMEOUT_S={profile.collective_timeout_s}")
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


def stage_argv(run_dir: str, job: Job, unit: str | None) -> list[str]:
    """``stage RUN_DIR STAGE [--unit NAME]`` (after ``python -m launcher``): what one unit runs,
    locally and in its SLURM task alike."""
    argv = ["stage", str(run_dir), job.stage]
    if unit is not None:
        argv += ["--unit", unit]
    if job.stage in TRAINING_STAGES and job.gpus_per_node > 1:
        argv += ["--nproc-per-node", str(job.gpus_per_node)]  # torchrun over this node's GPUs
    if job.stage in TRAINING_STAGES and job.nodes > 1:
        argv += ["--nodes", str(job.nodes)]  # srun tasks over the job's nodes (fairseq_ext/multinode.py)
    return argv


def python_command(profile: Profile, ctx: SbatchContext) -> str:
    return ctx.python or profile.python or sys.executable


ArgvFor = Callable[[Job, "str | None"], "list[str]"]  # (job, unit) -> argv after `python -m launcher`


@dataclass(frozen=True)
class Submission:
    """One sbatch call of the slurm executor."""
    folder: Path  # submitit's folder: the script, each task's pickled StageCommand, the job log
    python: str  # submitit's ``python``: the start of the batch shell's one command
    parameters: dict  # SlurmExecutor.update_parameters(**parameters)
    units: list  # unit names, in array-index order
    task_argvs: list  # per unit: the argv its pickled StageCommand runs after `python -m launcher`
    array: bool  # submitted with --array (map_array); one unit is a plain job, even of an array stage
    script: str  # the exact text submitit writes and sbatch reads


def submission(job: Job, profile: Profile, ctx: SbatchContext, argv_for: ArgvFor | None = None) -> Submission:
    """The submission of ``job`` (``argv_for``: each unit's command; default ``stage_argv``).

    The script is built the way submitit 1.5 builds it: ``SlurmExecutor._submitit_command_str``
    (``<python> -u -m submitit.core._submit <folder>``) as the command of
    ``_make_sbatch_string(folder=<folder>, map_count=<tasks if an array>, **parameters)``; and
    ``map_array`` of a single task submits a plain job (no ``--array``)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = RunLayout(ctx.run_dir).submitit.expanduser().absolute()
    python = "exec " + shlex.quote(python_command(profile, ctx))
    parameters = slurm_parameters(job, profile, ctx)
    units = [u.name for u in job.units]
    task_argvs = [argv_for(job, u) if argv_for else stage_argv(ctx.run_dir, job, u) for u in units]
    array = job.array and len(units) > 1
    runner = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    script = _make_sbatch_string(command=runner, folder=folder, map_count=len(units) if array else None,
                                 **parameters)
    return Submission(folder=folder, python=python, parameters=parameters, units=units,
                      task_argvs=task_argvs, array=array, script=script)


def array_parts(job: Job, max_array_size: int | None) -> list[Job]:
    """``job`` as the arrays SLURM accepts: parts of at most ``max_array_size`` units each (the
    cluster's MaxArraySize bounds an array's indices), in unit order. Each part is one sbatch
    call; dependencies and status treat the parts as one job (launcher/executors/slurm.py)."""
    if not job.array or not max_array_size or len(job.units) <= max_array_size:
        return [job]
    return [dataclasses.replace(job, units=job.units[i:i + max_array_size])
            for i in range(0, len(job.units), max_array_size)]


def format_tasks(sub: Submission) -> str:
    """One line per task: its array index (0 for a plain job) and the argv it runs."""
    return "".join(f"{i} {shlex.join(argv)}\n" for i, argv in enumerate(sub.task_argvs))


def render_sbatch(job: Job, profile: Profile, ctx: SbatchContext, argv_for: ArgvFor | None = None) -> str:
    """The script the slurm executor submits for ``job``: ``submission(...).script``."""
    return submission(job, profile, ctx, argv_for).script
