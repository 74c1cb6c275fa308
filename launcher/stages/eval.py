"""The eval stage: every configured method and baseline into ``results/`` (the body is
``launcher.stages_eval.evaluate_run``; this module declares and records it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.contract.layout import DENSE
from launcher.stages.base import Ctx, Params, Stage, device, units_of


@dataclass(frozen=True)
class EvalParams(Params):
    methods: list[str]
    baselines: list[str]
    domains: list[str]
    split: str
    top_k: int
    experts: list[str]  # the forest's experts, incremental ones included


def eval_units(cfg: Config):
    ev = cfg.evaluation
    return units_of([(None, EvalParams(list(ev.methods), list(cfg.baselines), list(cfg.domains.eval), ev.split,
                                       ev.top_k, [*cfg.expert_names, *cfg.domains.incremental]))])


def eval_inputs(ctx: Ctx) -> list[Path]:
    p = ctx.params
    models = [*p.experts, *([DENSE] if "dense" in p.baselines else [])]
    return [ctx.layout.forest, *[ctx.layout.checkpoint(m) for m in models]]


def eval_run(ctx: Ctx):
    from launcher.stages_eval import evaluate_run

    evaluate_run(ctx, device())
    res = ctx.layout.results
    return [q for q in (res / "results.csv", res / "results.parquet") if q.exists()], {}


STAGE = Stage("eval", EvalParams, eval_units, eval_inputs, eval_run, after_ok=lambda cfg: ["score"],
              gpus=lambda cfg: 1)
