"""The pipeline's stages: one module each, and THE registry of them (``STAGES``, in pipeline
order). ``launcher.plan`` builds the jobs from it; ``run_stage`` (``python -m launcher stage``)
runs one unit of one of them.

Order: data_plan -> data_shard (array) -> data -> [cluster_fit -> cluster_assign (array) -> cluster]
-> [seed] -> train (array) -> [dense] -> merge -> [moe] -> [data_incremental
-> grow (array)] -> score (array) -> eval -> report; a stage's ``enabled(cfg)`` says whether
the config's pipeline has it, its ``after_ok``/``after_any`` which jobs it waits for.

``fewshot.py`` is the one job outside the pipeline (``btm fewshot run``: an array over few-shot
task x seed x method, docs/fewshot.md), so it is not in ``STAGES``.
"""
from __future__ import annotations

import difflib

from launcher.config import Config
from launcher.contract.errors import BtmError, shown
from launcher.stages import cluster, data, dense, eval, grow, merge, moe, report, score, seed, train
from launcher.stages.base import Stage, Unit

STAGES: list[Stage] = [data.PLAN_STAGE, data.SHARD_STAGE, data.STAGE,
                       cluster.FIT_STAGE, cluster.ASSIGN_STAGE, cluster.STAGE,
                       seed.STAGE, train.STAGE, dense.STAGE, merge.STAGE, moe.STAGE,
                       data.INCREMENTAL_STAGE, grow.STAGE, score.STAGE, eval.STAGE, report.STAGE]

# The stages that run fairseq_ext.train (a job with several GPUs runs them under torchrun).
TRAINING_STAGES = tuple(s.name for s in STAGES if s.trains)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    names = [s.name for s in STAGES]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise BtmError(f"unknown stage {shown(name)}{hint}; known: {', '.join(names)}")


def find_unit(cfg: Config, stage: str, name: str | None) -> Unit:
    units = get_stage(stage).units(cfg)
    for u in units:
        if u.name == name:
            return u
    known = ", ".join(str(u.name) for u in units)
    raise BtmError(f"stage {shown(stage)} has no unit {shown(name)}; its units: {known}")


# The runner reads the registry above, so it is imported after it.
from launcher.stages.runner import load_run_config, run_stage  # noqa: E402
from launcher.stages.training import Preempted, accumulation_steps  # noqa: E402

__all__ = ["STAGES", "TRAINING_STAGES", "Preempted", "Stage", "Unit", "accumulation_steps", "find_unit",
           "get_stage", "load_run_config", "run_stage"]
