"""Cluster profiles: the site-specific half of a job's resources.

A profile (``slurm_templates/profiles/<name>.yaml``) says where and how jobs run: partition,
account, qos, constraint, GPUs per node, CPUs, memory, time limit, extra sbatch lines, with
optional per-stage overrides. The planner decides how many GPUs and nodes each job needs from
the compute budget; the profile fills in the rest.

CPUs and memory follow a job's GPUs where the profile says how much of them comes with one GPU
(``cpus_per_gpu``, ``mem_per_gpu``): an expert on 2 of a node's 8 GPUs asks for a quarter of
the node, so SLURM packs four on it. A stage's own ``cpus_per_task`` / ``mem`` override wins;
jobs without GPUs take ``cpus_per_task`` / ``mem``.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from launcher.contract.errors import BtmError, shown
from launcher.profile_files import known_profiles, profile_dirs
from launcher.stages import STAGES
from launcher.user_yaml import read_user_yaml

# The pipeline's stages (the registry) and `btm fewshot run`'s job (launcher/stages/fewshot.py), which
# runs outside the pipeline: the names a profile's `stages:` section may set resources for.
STAGE_NAMES = (*(stage.name for stage in STAGES), "fewshot")
_EXTRA_LINE = re.compile(r"--[a-z][a-z0-9-]*(=.+)?")
# sbatch's --mem: a whole number, optionally with a unit (K, M, G, T; default M).
_MEM = re.compile(r"([0-9]+)([KMGT]?)")  # mem 0: all of the node's memory
# The smallest value of each integer key (time in minutes; a job of 0 minutes never runs).
_MINIMUM = {"gpus_per_node": 0, "cpus_per_task": 1, "cpus_per_gpu": 1, "time": 1, "signal_grace_s": 0,
            "max_nodes": 1, "collective_timeout_s": 1}


@dataclass
class StageResources:
    """Per-stage overrides; None keeps the profile's value."""
    cpus_per_task: int | None = None
    mem: str | None = None
    time: int | None = None
    gpus_per_node: int | None = None
    cpus_per_gpu: int | None = None
    mem_per_gpu: str | None = None


@dataclass
class Profile:
    name: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 0  # 0: CPU-only cluster (or the local machine)
    cpus_per_task: int = 1  # jobs without GPUs, and GPU jobs when cpus_per_gpu is not set
    mem: str | None = None  # e.g. "32G"; like cpus_per_task
    cpus_per_gpu: int | None = None  # a GPU job's CPUs per task: this x its GPUs per node
    mem_per_gpu: str | None = None  # a GPU job's memory per node: this x its GPUs per node, e.g. "60G"
    time: int = 60  # minutes
    signal_grace_s: int = 120  # SIGUSR2 this long before the time limit
    max_nodes: int = 1  # nodes one training job may span (data parallel); beyond, gradient accumulation
    collective_timeout_s: int = 600  # a multi-node job's ranks fail, never hang, when a peer is lost
    python: str | None = None  # interpreter on the compute nodes; default: the submitting one
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ["--exclusive", "--mail-type=END"]
    stages: dict[str, StageResources] = field(default_factory=dict)

    def for_stage(self, stage: str) -> "Profile":
        over = self.stages.get(stage)
        if over is None:
            return self
        changes = {k: v for k, v in dataclasses.asdict(over).items() if v is not None}
        return dataclasses.replace(self, **changes)

    def cpus_and_mem(self, stage: str, gpus_per_node: int) -> tuple[int, str | None]:
        """CPUs per task and memory per node of a job of ``stage`` holding ``gpus_per_node`` GPUs."""
        over = self.stages.get(stage) or StageResources()
        p = self.for_stage(stage)
        cpus, mem = p.cpus_per_task, p.mem
        if gpus_per_node > 0 and p.cpus_per_gpu and over.cpus_per_task is None:
            cpus = p.cpus_per_gpu * gpus_per_node
        if gpus_per_node > 0 and p.mem_per_gpu and over.mem is None:
            amount, unit = _MEM.fullmatch(p.mem_per_gpu).groups()
            mem = f"{int(amount) * gpus_per_node}{unit}"
        return cpus, mem


def _check(value, tp, key: str, where: str):
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp](value)
    if not ok:
        raise BtmError(f"{where}: {key}: expected {tp.__name__}, got {shown(value)}")
    if tp is str and (not value or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise BtmError(f"{where}: {key}: {shown(value)} is empty or has control characters (newline, tab, ...)")
    name = key.rsplit(".", 1)[-1]
    if tp is int and value < _MINIMUM[name]:
        raise BtmError(f"{where}: {key}: must be at least {_MINIMUM[name]}, got {value}")
    size = _MEM.fullmatch(value) if name in ("mem", "mem_per_gpu") else None
    if name in ("mem", "mem_per_gpu") and not (size and (name == "mem" or int(size.group(1)) > 0)):
        raise BtmError(f"{where}: {key}: {shown(value)} is not a size; use a whole number with an "
                       "optional unit K, M, G or T, e.g. 32G (sbatch --mem" + (")" if name == "mem" else "; at least 1)"))
    return value


def _check_grace(profile: Profile, where: str) -> None:
    """SIGUSR2 comes signal_grace_s before the time limit: it must fit in every stage's time."""
    for stage in (None, *profile.stages):
        p = profile.for_stage(stage) if stage else profile
        if p.signal_grace_s >= p.time * 60:
            label = f"stages.{stage}.time" if stage and profile.stages[stage].time is not None else "time"
            raise BtmError(f"{where}: signal_grace_s ({p.signal_grace_s} s) must be shorter than {label} "
                           f"({p.time} min = {p.time * 60} s): the stop signal would come before the job ran")


def parse_profile(data: dict, where: str, name: str) -> Profile:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BtmError(f"{where}: expected a mapping")
    simple = {f.name: f for f in dataclasses.fields(Profile)} 
    kwargs: dict = {"name": name}
    for key, value in data.items():
        if key not in simple or key == "name":
            close = difflib.get_close_matches(str(key), list(simple), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BtmError(f"{where}: unknown key {shown(key)}{hint}")
        if key == "extra_sbatch":
            if not isinstance(value, list):
                raise BtmError(f"{where}: extra_sbatch: expected a list of '--flag=value' strings")
            for i, line in enumerate(value):
                if not isinstance(line, str) or not _EXTRA_LINE.fullmatch(line) or any(ord(c) < 32 for c in line):
                    raise BtmError(f"{where}: extra_sbatch[{i}]: expected '--flag' or '--flag=value', got {shown(line)}")
            kwargs[key] = list(value)
        elif key == "stages":
            if not isinstance(value, dict):
                raise BtmError(f"{where}: stages: expected a mapping stage -> resources")
            stages = {}
            for stage, over in value.items():
                if stage not in STAGE_NAMES:
                    raise BtmError(f"{where}: stages.{shown(stage)}: unknown stage; known: {', '.join(STAGE_NAMES)}")
                fields = {f.name for f in dataclasses.fields(StageResources)}
                if not isinstance(over, dict) or set(over) - fields:
                    raise BtmError(f"{where}: stages.{stage}: expected keys among {', '.join(sorted(fields))}")
                for k, v in over.items():
                    _check(v, str if k in ("mem", "mem_per_gpu") else int, f"stages.{stage}.{k}", where)
                stages[stage] = StageResources(**over)
            kwargs[key] = stages
        elif value is None:
            kwargs[key] = None
        else:
            kwargs[key] = _check(value, int if key in _MINIMUM else str, key, where)
    profile = Profile(**kwargs)
    _check_grace(profile, where)
    return profile


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not (name_or_path.endswith(".yaml") and path.is_file()):
        path = next((d / f"{name_or_path}.yaml" for d in profile_dirs() if (d / f"{name_or_path}.yaml").is_file()), None)
        if path is None:
            raise BtmError(f"unknown cluster profile {name_or_path!r}; known: {', '.join(known_profiles())}")
    return parse_profile(read_user_yaml(path, "cluster profile"), str(path), path.stem)
