"""The eval stage: every configured method and baseline of the run into ``results/``, through
the same functions as `btm eval` and `btm average` (launcher/stages/evaluation.py). The scores
were cached by the score array (same cache key), so this is mostly mixing."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.contract import methods as registry
from launcher.contract.forest import verified_checkpoints
from launcher.contract.layout import DENSE, MOE, SEED, random_split_name
from launcher.stages.base import Ctx, Params, Stage, device, units_of
from launcher.stages.evaluation import evaluate_merges, evaluate_mixes, evaluate_model, evaluate_moe


@dataclass(frozen=True)
class EvalParams(Params):
    methods: list[str]
    baselines: list[str]
    domains: list[str]
    split: str
    top_k: int
    experts: list[str]  # the forest's experts, incremental ones included
    moe: bool = False  # the forest's MoE model (stage moe) is scored too


def eval_units(cfg: Config):
    ev = cfg.evaluation
    return units_of([(None, EvalParams(list(ev.methods), list(cfg.baselines), list(cfg.domains.eval), ev.split,
                                       ev.top_k, [*cfg.expert_names, *cfg.domains.incremental],
                                       cfg.moe.enabled))])


def eval_inputs(ctx: Ctx) -> list[Path]:
    p = ctx.params
    models = [*p.experts, *([DENSE] if "dense" in p.baselines else []), *([MOE] if p.moe else [])]
    if registry.of_kind("merge", p.methods) and ctx.layout.checkpoint(SEED).exists():
        models.append(SEED)  # the base of the merges' task vectors (the experts' branch.json)
    return [ctx.layout.forest, *[ctx.layout.checkpoint(m) for m in models]]


def eval_run(ctx: Ctx):
    """Every configured method and baseline of the run into results/."""
    from fairseq_ext.evaluate import EvalSettings

    p, cfg = ctx.params, ctx.config
    layout = ctx.layout
    experts = verified_checkpoints(layout.forest)
    domains, methods = list(p.domains), list(p.methods)
    settings = EvalSettings(methods=(), top_k=(p.top_k,), split=p.split, device=device())
    common = dict(name=cfg.name, data_dir=ctx.data_dir)
    mixes = [m for m in methods if registry.canonical(m) in registry.MIXES]
    if mixes:
        evaluate_mixes(layout, experts, domains, dataclasses.replace(settings, methods=tuple(mixes)), **common)
    evaluate_merges(layout, experts, methods, domains, settings, **common)
    if "dense" in p.baselines:
        evaluate_model(layout, "dense", layout.checkpoint(DENSE), domains, settings, **common)
    if p.moe:
        evaluate_moe(layout, layout.checkpoint(MOE), domains, settings, experts=list(cfg.expert_names),
                     **common)
    if "random_split" in p.baselines:
        shards = {random_split_name(i): layout.checkpoint(random_split_name(i))
                  for i in range(len(cfg.expert_names))}
        evaluate_mixes(layout, shards, domains, dataclasses.replace(settings, methods=("random_split",)),
                       **common)
    res = layout.results
    return [q for q in (res / "results.csv", res / "results.parquet") if q.exists()], {}


STAGE = Stage("eval", EvalParams, eval_units, eval_inputs, eval_run, after_ok=lambda cfg: ["score"],
              gpus=lambda cfg: 1)
