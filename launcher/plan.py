"""The plan: which jobs a config needs, their units, dependencies, resources and budget.

Pure functions of (config, profile, which units are done). The same plan drives the local
executor, the SLURM executor and ``btm run --dry-run``.

Stages (docs/architecture.md): data -> [cluster] -> seed -> train (array, one task per expert,
plus the random-split baseline's experts) -> merge (forest.json; runs after *any* train end,
naming missing experts) -> [grow (incremental experts)] -> score (array over (model, eval
domain)) -> eval -> report; the dense baseline is its own job beside seed and train.

Compute budget (BTM paper): the dense run is ``U`` updates on ``G`` GPUs. The seed LM spends
``seed_fraction * U`` updates on all ``G`` GPUs; each of the ``N`` experts then trains for the
remaining updates on ``G / N`` of the GPUs (batch ``1/N`` of the dense batch), so the forest's
GPU-updates, seed included, equal the dense baseline's. A job never spans nodes: where the
budget names more GPUs than a node has, the job takes one node's GPUs and accumulates
gradients to keep the batch (same updates and tokens, longer wall time).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from launcher.config import Config
from launcher.contract import methods
from launcher.profiles import Profile


@dataclass(frozen=True)
class Unit:
    """One unit of work of a stage: ``python -m launcher stage RUN_DIR STAGE --unit NAME``."""
    name: str | None  # None for single-unit stages (record: records/<stage>.json)
    params: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def record_name(self) -> str:
        return self.name or ""


@dataclass(frozen=True)
class Budget:
    updates: int = 0
    gpus: float = 0.0  # nominal GPUs of the budget (a share for experts), not the allocation
    tokens: int = 0

    @property
    def gpu_updates(self) -> float:
        return self.updates * self.gpus


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


# ---- units of each stage (pure functions of the config) ----------------------------------

def _updates(cfg: Config) -> tuple[int, int]:
    seed_updates = round(cfg.budget.seed_fraction * cfg.total_updates)
    return seed_updates, cfg.total_updates - seed_updates


def _dense_tokens_per_update(cfg: Config) -> int:
    return cfg.total_gpus * cfg.preset.tokens_per_update_per_gpu


def _train_params(cfg: Config, name: str, domains: list[str], init: str | None, updates: int,
                  tokens_per_batch: int, seed: int, **extra) -> dict:
    return {"name": name, "domains": domains, "init": init, "preset": cfg.model.preset,
            "max_updates": updates, "tokens_per_batch": tokens_per_batch, "seed": seed,
            "save_interval_updates": min(cfg.budget.save_interval_updates, max(updates, 1)), **extra}


def data_units(cfg: Config) -> list[Unit]:
    base = [*cfg.domains.train, *[d for d in cfg.domains.eval if d not in cfg.domains.train]]
    # c-BTM: clusters are made from (and replace) the training domains; eval domains are kept.
    return [Unit(None, {"corpus": cfg.corpus.path, "domains": base, "train_domains": list(cfg.domains.train),
                        "vocab_size": cfg.corpus.vocab_size, "text_field": cfg.corpus.text_field,
                        "random_split": len(cfg.expert_names) if "random_split" in cfg.baselines else 0})]


def data_incremental_units(cfg: Config) -> list[Unit]:
    new = [d for d in cfg.domains.incremental if d not in cfg.domains.eval]
    return [Unit("incremental", {"corpus": cfg.corpus.path, "domains": list(cfg.domains.incremental),
                                 "new_domains": new, "text_field": cfg.corpus.text_field})]


def cluster_units(cfg: Config) -> list[Unit]:
    return [Unit(None, {"k": cfg.clusters.k, "domains": list(cfg.domains.train), "seed": cfg.seed,
                        "corpus": cfg.corpus.path, "text_field": cfg.corpus.text_field})]


def seed_units(cfg: Config) -> list[Unit]:
    seed_updates, _ = _updates(cfg)
    return [Unit(None, _train_params(cfg, "seed", cfg.expert_names if cfg.method == "cbtm" else list(cfg.domains.train),
                                     None, seed_updates, _dense_tokens_per_update(cfg), cfg.seed))]


def train_units(cfg: Config) -> list[Unit]:
    seed_updates, expert_updates = _updates(cfg)
    n = len(cfg.expert_names)
    init = "seed" if seed_updates > 0 else None
    tokens = max(1, _dense_tokens_per_update(cfg) // n)
    units = [Unit(name, _train_params(cfg, name, [name], init,
                                      expert_updates, tokens, cfg.seed))
             for name in cfg.expert_names]
    if "random_split" in cfg.baselines:
        # random<i>: a random 1/n of the pooled training documents (built by the data stage)
        units += [Unit(f"random{i}", _train_params(cfg, f"random{i}", [f"random{i}"], init,
                                                   expert_updates, tokens, cfg.seed))
                  for i in range(n)]
    return units


def dense_units(cfg: Config) -> list[Unit]:
    domains = cfg.expert_names if cfg.method == "cbtm" else list(cfg.domains.train)
    return [Unit(None, _train_params(cfg, "dense", domains, None, cfg.total_updates,
                                     _dense_tokens_per_update(cfg), cfg.seed))]


def merge_units(cfg: Config) -> list[Unit]:
    return [Unit(None, {"experts": cfg.expert_names})]


def grow_units(cfg: Config) -> list[Unit]:
    _, expert_updates = _updates(cfg)
    tokens = max(1, _dense_tokens_per_update(cfg) // len(cfg.expert_names))
    return [Unit(d, _train_params(cfg, d, [d], cfg.branching.rule, expert_updates, tokens, cfg.seed,
                                  top_k=cfg.branching.top_k, sample_docs=cfg.branching.sample_docs,
                                  parents=cfg.expert_names))
            for d in cfg.domains.incremental]


def scored_models(cfg: Config) -> list[str]:
    models = [*cfg.expert_names, *cfg.domains.incremental]
    if "random_split" in cfg.baselines:
        models += [f"random{i}" for i in range(len(cfg.expert_names))]
    if "dense" in cfg.baselines:
        models.append("dense")
    return models


PRIOR_SPLIT = "valid"  # the cached domain prior is estimated on held-out data (fairseq_ext.priors)


def score_units(cfg: Config) -> list[Unit]:
    """One unit per model (loaded once): every eval domain on the eval split, plus the prior
    split for the forest's experts when a method needs the domain prior."""
    needs_prior = methods.needs_prior(cfg.evaluation.methods) and cfg.evaluation.split != PRIOR_SPLIT
    experts = {*cfg.expert_names, *cfg.domains.incremental}
    return [Unit(m, {"model": m, "domains": list(cfg.domains.eval),
                     "splits": [cfg.evaluation.split, *([PRIOR_SPLIT] if needs_prior and m in experts else [])]})
            for m in scored_models(cfg)]


def eval_units(cfg: Config) -> list[Unit]:
    return [Unit(None, {"methods": list(cfg.evaluation.methods), "baselines": list(cfg.baselines),
                        "domains": list(cfg.domains.eval), "split": cfg.evaluation.split,
                        "top_k": cfg.evaluation.top_k, "experts": [*cfg.expert_names, *cfg.domains.incremental]})]


def report_units(cfg: Config) -> list[Unit]:
    return [Unit(None, {"run": cfg.name})]


STAGE_UNITS: dict[str, Callable[[Config], list[Unit]]] = {
    "data": data_units, "data_incremental": data_incremental_units, "cluster": cluster_units,
    "seed": seed_units, "train": train_units, "dense": dense_units, "merge": merge_units,
    "grow": grow_units, "score": score_units, "eval": eval_units, "report": report_units,
}


def stage_units(cfg: Config, stage: str) -> list[Unit]:
    return STAGE_UNITS[stage](cfg)


def find_unit(cfg: Config, stage: str, name: str | None) -> Unit:
    from launcher.contract.errors import BtmError

    if stage not in STAGE_UNITS:
        raise BtmError(f"unknown stage {stage!r}; known: {', '.join(STAGE_UNITS)}")
    units = stage_units(cfg, stage)
    for u in units:
        if u.name == name:
            return u
    known = ", ".join(str(u.name) for u in units)
    raise BtmError(f"stage {stage!r} has no unit {name!r}; its units: {known}")


# ---- the plan -----------------------------------------------------------------------------

def job_resources(profile: Profile, stage: str, gpus: int) -> dict:
    """nodes (always 1), GPUs per node, CPUs, memory and time of a job of ``stage``.

    One node, at most its GPUs: no process group spans nodes (the trainer runs torchrun
    --standalone over one node's GPUs). A seed or dense run whose budget names more GPUs than a
    node has keeps the budget's batch by accumulating gradients (stages.accumulation_steps):
    the same updates, on fewer GPUs, for proportionally longer."""
    p = profile.for_stage(stage)
    if p.gpus_per_node <= 0 or gpus <= 0:
        return {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": p.cpus_per_task, "mem": p.mem, "time": p.time}
    return {"nodes": 1, "gpus_per_node": min(gpus, p.gpus_per_node),
            "cpus_per_task": p.cpus_per_task, "mem": p.mem, "time": p.time}


def build_plan(cfg: Config, profile: Profile, run_dir: str,
               is_done: Callable[[str, Unit], bool] = lambda stage, unit: False) -> Plan:
    """All jobs of the run, each knowing which of its units are already done.

    A job whose upstream job has pending units is entirely pending: its inputs will change.
    (A unit whose inputs turn out unchanged returns at once when its command runs.)
    """
    G = cfg.total_gpus
    n = len(cfg.expert_names)
    seed_updates, expert_updates = _updates(cfg)
    tpu = _dense_tokens_per_update(cfg)
    expert_gpus = max(1, G // n)
    jobs: list[Job] = []

    def add(name, stage, *, array=False, after_ok=(), after_any=(), gpus=0, budget=Budget()):
        units = stage_units(cfg, stage)
        jobs.append(Job(name=name, stage=stage, units=units, array=array, after_ok=list(after_ok),
                        after_any=list(after_any), budget=budget,
                        **job_resources(profile, stage, gpus)))

    add("data", "data")
    upstream = ["data"]
    if cfg.method == "cbtm":
        add("cluster", "cluster", after_ok=["data"])
        upstream = ["cluster"]
    if seed_updates > 0:
        add("seed", "seed", after_ok=upstream, gpus=G, budget=Budget(seed_updates, G, seed_updates * tpu))
        train_after = ["seed"]
    else:
        train_after = upstream
    add("train", "train", array=True, after_ok=train_after, gpus=expert_gpus,
        budget=Budget(expert_updates, G / n, expert_updates * (tpu // n)))
    if "dense" in cfg.baselines:
        add("dense", "dense", after_ok=upstream, gpus=G, budget=Budget(cfg.total_updates, G, cfg.total_updates * tpu))
    add("merge", "merge", after_any=["train"])
    score_after = ["merge"]
    if cfg.domains.incremental:
        add("data_incremental", "data_incremental", after_ok=["data"])
        add("grow", "grow", array=True, after_ok=["merge", "data_incremental"], gpus=expert_gpus,
            budget=Budget(expert_updates, G / n, expert_updates * (tpu // n)))
        score_after = ["grow"]
    if "dense" in cfg.baselines:
        score_after = [*score_after, "dense"]
    add("score", "score", array=True, after_ok=score_after, gpus=1)
    add("eval", "eval", after_ok=["score"], gpus=1)
    add("report", "report", after_ok=["eval"])

    # Which units are done; a pending upstream job makes its dependents pending.
    by_name = {j.name: j for j in jobs}
    for job in jobs:  # jobs are in topological order
        if any(by_name[d].pending for d in job.dependencies):
            continue
        job.done = {u.name for u in job.units if is_done(job.stage, u)}
    return Plan(cfg, profile, run_dir, jobs)


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
    seed_updates, expert_updates = _updates(cfg)
    G, U, n = cfg.total_gpus, cfg.total_updates, len(cfg.expert_names)
    lines = [
        f"run {cfg.name!r}: method {cfg.method}, preset {cfg.model.preset}, executor {cfg.executor}, profile {prof.name}",
        f"run directory: {plan.run_dir}",
        f"budget: {U} updates x {G} GPUs = {U * G} GPU-updates (the dense baseline's); "
        f"seed {seed_updates} updates on {G} GPUs; {n} experts x {expert_updates} updates on {G}/{n} GPUs each",
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
    return "\n".join(lines) + "\n"
