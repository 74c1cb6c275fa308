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

import yaml

from launcher.contract.errors import BtmError
from launcher.profile_files import known_profiles, profile_dirs
from launcher.stages import STAGES

# The pipeline's stages (the registry) and `btm fewshot run`'s job (launcher/stages/fewshot.py), which
# runs outside the pipeline: the names a profile's `stages:` section may set resources for.
STAGE_NAMES = (*(stage.name for stage in STAGES), "fewshot")
_EXTRA_LINE = re.compile(r"--[a-z][a-z0-9-]*(=.+)?")
_MEM = re.compile(r"([1-9][0-9]*)([KMGT]?)")  # SLURM's --mem: an integer, unit K, M, G or T (default M)
_INT_KEYS = ("gpus_per_node", "cpus_per_task", "cpus_per_gpu", "time", "signal_grace_s", "max_nodes",
             "collective_timeout_s")


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
        raise BtmError(f"{where}: {key}: expected {tp.__name__}, got {value!r}")
    if tp is str and (not value or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise BtmError(f"{where}: {key}: {value!r} is empty or has control characters (newline, tab, ...)")
    return value


def _check_mem(value: str, key: str, where: str) -> None:
    if not _MEM.fullmatch(value):
        raise BtmError(f"{where}: {key}: expected SLURM memory like '60G' (an integer, unit K, M, G or T), got {value!r}")


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
            raise BtmError(f"{where}: unknown key {key!r}{hint}")
        if key == "extra_sbatch":
            if not isinstance(value, list):
                raise BtmError(f"{where}: extra_sbatch: expected a list of '--flag=value' strings")
            for i, line in enumerate(value):
                if not isinstance(line, str) or not _EXTRA_LINE.fullmatch(line) or any(ord(c) < 32 for c in line):
                    raise BtmError(f"{where}: extra_sbatch[{i}]: expected '--flag' or '--flag=value', got {line!r}")
            kwargs[key] = list(value)
        elif key == "stages":
            if not isinstance(value, dict):
                raise BtmError(f"{where}: stages: expected a mapping stage -> resources")
            stages = {}
            for stage, over in value.items():
                if stage not in STAGE_NAMES:
                    raise BtmError(f"{where}: stages.{stage}: unknown stage; known: {', '.join(STAGE_NAMES)}")
                fields = {f.name for f in dataclasses.fields(StageResources)}
                if not isinstance(over, dict) or set(over) - fields:
                    raise BtmError(f"{where}: stages.{stage}: expected keys among {', '.join(sorted(fields))}")
                for k, v in over.items():
                    _check(v, str if k in ("mem", "mem_per_gpu") else int, f"stages.{stage}.{k}", where)
                    if k == "mem_per_gpu":
                        _check_mem(v, f"stages.{stage}.{k}", where)
                stages[stage] = StageResources(**over)
            kwargs[key] = stages
        elif value is None:
            kwargs[key] = None
        else:
            kwargs[key] = _check(value, int if key in _INT_KEYS else str, key, where)
            if key in ("max_nodes", "collective_timeout_s") and value < 1:
                raise BtmError(f"{where}: {key}: must be at least 1, got {value}")
            if key == "mem_per_gpu":
                _check_mem(value, key, where)
    return Profile(**kwargs)


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not (name_or_path.endswith(".yaml") and path.is_file()):
        path = next((d / f"{name_or_path}.yaml" for d in profile_dirs() if (d / f"{name_or_path}.yaml").is_file()), None)
        if path is None:
            raise BtmError(f"unknown cluster profile {name_or_path!r}; known: {', '.join(known_profiles())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise BtmError(f"cannot read cluster profile {path}: {e}") from None
    return parse_profile(data, str(path), path.stem)
