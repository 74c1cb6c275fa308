"""The plan: which jobs a config needs, their units, dependencies, resources and budget.

Pure functions of (config, profile, which units are done). The same plan drives the local
executor, the SLURM executor and ``btm run --dry-run``.

One job per stage of the registry (``launcher.stages.STAGES``, in pipeline order) that is
enabled for the config; each stage module declares its units, dependencies, GPUs and budget
(the compute budget: launcher/stages/training.py). Where the budget names more GPUs than a
node has, a training job spans ``ceil(G / gpus_per_node)`` nodes, up to the profile's
``max_nodes``; beyond that it accumulates gradients to keep the batch (same updates and
tokens, longer wall time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from launcher.config import Config, mixture_label
from launcher.profiles import Profile
from launcher.stages import STAGES, TRAINING_STAGES
from launcher.stages.base import Budget, Unit  # noqa: F401  (re-exported: a job's units and budget)
from launcher.stages.training import moe_updates, split_updates


@dataclass
class Job:
    name: str  # unique within the run; SLURM job name is "<run>.<name>"
    stage: str
    units: list[Unit]
    array: bool = False
    after_ok: list[str] = field(default_factory=list)
    after_any: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    time: int = 60
    budget: Budget = field(default_factory=Budget)  # per unit
    done: set = field(default_factory=set)  # names of units already done

    @property
    def pending(self) -> list[Unit]:
        return [u for u in self.units if u.name not in self.done]

    @property
    def dependencies(self) -> list[str]:
        return self.after_ok + self.after_any


@dataclass
class Plan:
    config: Config
    profile: Profile
    run_dir: str
    jobs: list[Job]

    def job(self, name: str) -> Job:
        return next(j for j in self.jobs if j.name == name)

    @property
    def to_submit(self) -> list[Job]:
        """Jobs with pending units, their dependencies pruned to jobs also being submitted."""
        out = []
        names = {j.name for j in self.jobs if j.pending}
        for j in self.jobs:
            if not j.pending:
                continue
            out.append(Job(**{**j.__dict__, "units": j.pending,
                              "after_ok": [d for d in j.after_ok if d in names],
                              "after_any": [d for d in j.after_any if d in names],
                              "done": set()}))
        return out


# ---- the plan -----------------------------------------------------------------------------

def job_resources(profile: Profile, stage: str, gpus: int) -> dict:
    """Nodes, GPUs per node, CPUs, memory and time of a job of ``stage`` whose budget names ``gpus``.

    A job takes the budget's GPUs, a node's worth per node, on up to the profile's
    ``max_nodes`` nodes (data parallel across them, fairseq_ext/multinode.py); on a CPU-only
    profile each of the budget's GPUs is one training process, one per node. Past ``max_nodes``
    the job keeps the budget's batch by accumulating gradients
    (launcher.stages.training.accumulation_steps): the same updates, on fewer GPUs, for
    proportionally longer. CPUs and memory follow the GPUs where the profile says so
    (``Profile.cpus_and_mem``)."""
    p = profile.for_stage(stage)
    per_node = p.gpus_per_node if p.gpus_per_node > 0 else 1
    nodes = max(1, min(p.max_nodes, math.ceil(gpus / per_node))) if gpus > 0 else 1
    gpus_per_node = min(gpus, p.gpus_per_node) if p.gpus_per_node > 0 and gpus > 0 else 0
    cpus, mem = profile.cpus_and_mem(stage, gpus_per_node)
    return {"nodes": nodes, "gpus_per_node": gpus_per_node, "cpus_per_task": cpus, "mem": mem, "time": p.time}


def build_plan(cfg: Config, profile: Profile, run_dir: str,
               is_done: Callable[[str, Unit], bool] = lambda stage, unit: False) -> Plan:
    """All jobs of the run, each knowing which of its units are already done.

    A job whose upstream job has pending units is entirely pending: its inputs will change.
    (A unit whose inputs turn out unchanged returns at once when its command runs.)
    """
    jobs = [Job(name=stage.name, stage=stage.name, units=stage.units(cfg), array=stage.array,
                after_ok=stage.after_ok(cfg), after_any=stage.after_any(cfg), budget=stage.budget(cfg),
                **job_resources(profile, stage.name, stage.gpus(cfg)))
            for stage in STAGES if stage.enabled(cfg)]

    # Which units are done; a pending upstream job makes its dependents pending.
    by_name = {j.name: j for j in jobs}
    for job in jobs:  # jobs are in topological order
        if any(by_name[d].pending for d in job.dependencies):
            continue
        job.done = {u.name for u in job.units if is_done(job.stage, u)}
    return Plan(cfg, profile, run_dir, jobs)


def launch_line(job: Job) -> str | None:
    """The job step a multi-node training job's stage starts (``fairseq_ext.multinode``), with
    placeholders for what only the running job knows; None for a job on one node."""
    if job.stage not in TRAINING_STAGES or job.nodes <= 1:
        return None
    from fairseq_ext.multinode import srun_argv  # stdlib and launcher.contract only: no torch

    per_node = max(1, job.gpus_per_node)
    work = "SAVE_DIR/.multinode-$SLURM_JOB_ID"
    argv = srun_argv(job.nodes, per_node, max(1, job.cpus_per_task // per_node), f"{work}/spec.json",
                     f"{work}/result.json", python="PYTHON")
    return " ".join(argv) + "  (MASTER_ADDR=first node, env://)"


# ---- the dry-run text ---------------------------------------------------------------------

def _fmt_num(x: float) -> str:
    x = round(x, 6)
    if x == 0:
        return "-"
    if float(x).is_integer():
        x = int(x)
        for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
            if x >= div * 10:
                return f"{x / div:.1f}{unit}".replace(".0" + unit, unit)
        return str(x)
    return f"{x:.2f}"


def format_plan(plan: Plan, only_pending: bool = True) -> str:
    cfg, prof = plan.config, plan.profile
    seed_updates, expert_updates = split_updates(cfg)
    G, U, n = cfg.total_gpus, cfg.total_updates, len(cfg.expert_names)
    lines = [
        f"run {cfg.name!r}: method {cfg.method}, preset {cfg.model.preset}, executor {cfg.executor}, profile {prof.name}, "
        f"mixture {mixture_label(cfg.data.mixture)}",
        f"run directory: {plan.run_dir}",
        f"budget: {U} updates x {G} GPUs = {U * G} GPU-updates (the dense baseline's); "
        f"seed {seed_updates} updates on {G} GPUs; {n} experts x {expert_updates} updates on {G}/{n} GPUs each"
        + (f"; MoE {moe_updates(cfg)} updates on {G} GPUs" if cfg.moe.enabled else ""),
        *([f"seed: imported from {cfg.model.init}" + (", used as is" if seed_updates == 0 else ", then trained on")]
          if cfg.model.init else []),
        f"training domains ({len(cfg.domains.train)}): {', '.join(cfg.domains.train)}",
        f"evaluation domains ({len(cfg.domains.eval)}): {', '.join(cfg.domains.eval)}",
        "",
    ]
    header = ("job", "stage", "units", "array", "after", "resources", "updates/unit", "GPU-updates", "tokens", "status")
    rows = []
    submit = {j.name: j for j in plan.to_submit}
    total_gu = 0.0
    for job in plan.jobs:
        pending = submit.get(job.name)
        if only_pending and pending is None:
            rows.append((job.name, job.stage, str(len(job.units)), "-", "-", "-", "-", "-", "-", "done"))
            continue
        units = pending.units if pending else job.units
        array = f"0-{len(units) - 1}%{min(len(units), cfg.max_parallel)}" if job.array else "-"
        deps = [f"afterok:{d}" for d in pending.after_ok] + [f"afterany:{d}" for d in pending.after_any]
        res = f"{job.nodes}n x {job.gpus_per_node}gpu, {job.cpus_per_task}cpu"
        if job.mem:
            res += f", {job.mem}"
        res += f", {job.time}min"
        gu = job.budget.gpu_updates * len(units)
        total_gu += gu
        rows.append((job.name, job.stage, str(len(units)), array, ",".join(deps) or "-", res,
                     _fmt_num(job.budget.updates), _fmt_num(gu), _fmt_num(job.budget.tokens * len(units)),
                     "submit" if len(units) == len(job.units) else f"submit {len(units)}/{len(job.units)}"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*header).rstrip())
    lines += [fmt.format(*r).rstrip() for r in rows]
    lines.append("")
    lines.append(f"jobs to submit: {len(submit)}; GPU-updates to spend: {_fmt_num(total_gu)}")
    for job in plan.jobs:
        if job.array and job.name in submit:
            units = submit[job.name].units
            names = ", ".join(str(u.name) for u in units[:12]) + (f", ... ({len(units)} in all)" if len(units) > 12 else "")
            lines.append(f"  {job.name} units: {names}")
    for job in plan.jobs:
        line = launch_line(job) if job.name in submit else None
        if line:
            lines.append(f"  {job.name} launch ({job.nodes} nodes): {line}")
    return "\n".join(lines) + "\n"
