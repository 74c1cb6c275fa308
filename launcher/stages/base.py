"""What a stage is: its declaration (``Stage``), its units (``Unit``), and the context a unit
runs in (``Ctx``), plus the small helpers every stage body shares.

A stage module (``launcher/stages/<stage>.py``) declares one ``STAGE = Stage(...)``: its typed
parameters, ``units(cfg)``, dependencies, resources and budget (read by ``launcher.plan``),
and ``inputs(ctx)`` / ``run(ctx)`` (called by ``launcher.stages.runner.run_stage``). Heavy
imports (fairseq_ext, torch, analysis) happen inside ``run``, so planning stays light.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from launcher.config import Config
from launcher.contract.errors import BtmError
from launcher.contract.layout import RunLayout


@dataclass(frozen=True)
class Unit:
    """One unit of work of a stage: ``python -m launcher stage RUN_DIR STAGE --unit NAME``.

    ``params`` is the stage's parameters as the record stores them (a plain dict, via
    ``dataclasses.asdict``: its spec hash says whether a record is current)."""
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


class Params:
    """Base of the stages' frozen parameter dataclasses (records store them as plain dicts)."""


def _none(cfg: Config) -> list[str]:
    return []


def _always(cfg: Config) -> bool:
    return True


def _no_gpus(cfg: Config) -> int:
    return 0


def _no_budget(cfg: Config) -> Budget:
    return Budget()


def _no_paths(ctx: "Ctx") -> list[Path]:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, everything about it in one declaration."""
    name: str
    params: type  # the frozen dataclass of a unit's parameters
    units: Callable[[Config], list[Unit]]
    inputs: Callable[["Ctx"], list[Path]]
    run: Callable[["Ctx"], tuple[list[Path], dict]]  # -> (outputs, extra record fields)
    after_ok: Callable[[Config], list[str]] = _none
    after_any: Callable[[Config], list[str]] = _none
    array: bool = False  # one array task per unit
    enabled: Callable[[Config], bool] = _always  # is this stage part of the config's pipeline
    gpus: Callable[[Config], int] = _no_gpus  # GPUs the budget names for one unit
    budget: Callable[[Config], Budget] = _no_budget  # compute of one unit
    trains: bool = False  # runs fairseq_ext.train (several GPUs: torchrun on one node)
    # Outputs that other verbs edit later (forest.json: `btm forest`, incremental experts), so
    # they cannot be hashed: the record lists them and the unit is done only while they exist.
    kept: Callable[["Ctx"], list[Path]] = _no_paths


@dataclass
class Ctx:
    """Where and what one unit runs: the run directory, its config, the unit."""
    run_dir: Path
    config: Config
    unit: Unit
    stage: Stage
    nproc: int = 1  # training processes on this node (one per GPU of the task)
    nodes: int = 1  # nodes of the job the training ranks span (srun tasks when > 1)

    @cached_property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @cached_property
    def params(self):
        """The unit's parameters, typed (the stage's ``params`` dataclass), built once."""
        return self.stage.params(**self.unit.params)

    @property
    def data_dir(self) -> Path:
        return self.layout.data

    def model_dir(self, name: str) -> Path:
        return self.layout.model_dir(name)


def units_of(params: list[tuple[str | None, Params]]) -> list[Unit]:
    """Units from (name, typed parameters); the record keeps the parameters as a dict."""
    from dataclasses import asdict

    return [Unit(name, asdict(p)) for name, p in params]


def need(module: str, attr: str):
    """Import ``module.attr`` or explain which part of btm is missing."""
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BtmError(f"this stage needs {module}.{attr}, which is not available: {e}") from None


def device() -> str:
    """BTM_DEVICE, else the GPU SLURM gave us, else the CPU."""
    if os.environ.get("BTM_DEVICE"):
        return os.environ["BTM_DEVICE"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n))
