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
from launcher.records import read_record
from launcher.stages.base import Ctx, Params, Stage, device, units_of
from launcher.stages.evaluation import (evaluate_merges, evaluate_mixes, evaluate_model, evaluate_moe,
                                       prior_fields, prior_settings)
from launcher.stages.score import PRIOR_SPLIT, scored_models


@dataclass(frozen=True)
class EvalParams(Params):
    methods: list[str]
    baselines: list[str]
    domains: list[str]
    split: str
    top_k: int
    experts: list[str]  # the forest's experts, incremental ones included
    run: str  # the results' run column (config name)
    # The cached prior's estimator, its block (the preset's context) and temperature candidates.
    prior_estimator: str = "document"
    prior_block_tokens: int = 1024
    prior_temperatures: list[float] = dataclasses.field(default_factory=lambda: list(registry.PRIOR_TEMPERATURES))
    moe: bool = False  # the forest's MoE model (stage moe) is scored too


def eval_units(cfg: Config):
    ev = cfg.evaluation
    return units_of([(None, EvalParams(list(ev.methods), list(cfg.baselines), list(cfg.domains.eval), ev.split,
                                       ev.top_k, [*cfg.expert_names, *cfg.domains.incremental], cfg.name,
                                       moe=cfg.moe.enabled, **prior_fields(cfg)))])


def eval_inputs(ctx: Ctx) -> list[Path]:
    """Everything the numbers depend on: the forest and the checkpoints, the eval split (and the
    prior's held-out split) of every eval domain, the score caches of the score array, and, for
    c-BTM, the fitted cluster model. An edited test split re-scores and so re-evaluates."""
    p, layout = ctx.params, ctx.layout
    models = [*p.experts, *([DENSE] if "dense" in p.baselines else []), *([MOE] if p.moe else [])]
    if registry.of_kind("merge", p.methods) and layout.checkpoint(SEED).exists():
        models.append(SEED)  # the base of the merges' task vectors (the experts' branch.json)
    splits = [p.split, *([PRIOR_SPLIT] if registry.needs_prior(p.methods) and p.split != PRIOR_SPLIT else [])]
    clusters = sorted(q for q in layout.cluster_model.glob("*") if q.is_file()) \
        if registry.of_kind("cluster", p.methods) else []
    return [layout.forest, *[layout.checkpoint(m) for m in models], *layout.split_files(p.domains, splits),
            *score_caches(ctx), *clusters]


def score_caches(ctx: Ctx) -> list[Path]:
    """The score caches the score array recorded as its outputs (what the mixing reads)."""
    out = []
    for model in scored_models(ctx.config):
        record = read_record(ctx.run_dir, "score", model)
        out += [ctx.run_dir / q for q in (record or {}).get("outputs", {})]
    return out


def eval_settings(p: EvalParams):
    """The EvalSettings of the eval stage (also those `btm forest ablate` re-mixes with)."""
    from fairseq_ext.evaluate import EvalSettings

    return EvalSettings(methods=(), top_k=(p.top_k,), split=p.split, prior=prior_settings(p), device=device())


def eval_run(ctx: Ctx):
    """Every configured method and baseline of the run into results/."""
    p, cfg = ctx.params, ctx.config
    layout = ctx.layout
    experts = verified_checkpoints(layout.forest)
    domains, methods = list(p.domains), list(p.methods)
    settings = eval_settings(p)
    common = dict(name=p.run, data_dir=ctx.data_dir)
    mixes = [m for m in methods if registry.canonical(m) in registry.MIXES]
    if mixes:
        evaluate_mixes(layout, experts, domains, dataclasses.replace(settings, methods=tuple(mixes)), **common)
    evaluate_merges(layout, experts, methods, domains, settings, **common)
    if "dense" in p.baselines:
        evaluate_model(layout, "dense", layout.checkpoint(DENSE), domains, settings, **common)
    if p.moe:
        # experts: the verified checkpoints; experts=: the MoE's slots, named as the forest
        evaluate_moe(layout, layout.checkpoint(MOE), experts, domains, settings,
                     experts=list(cfg.expert_names), **common)
    if "random_split" in p.baselines:
        shards = {random_split_name(i): layout.checkpoint(random_split_name(i))
                  for i in range(len(cfg.expert_names))}
        evaluate_mixes(layout, shards, domains, dataclasses.replace(settings, methods=("random_split",)),
                       **common)
    res = layout.results
    return [q for q in (res / "results.csv", res / "results.parquet") if q.exists()], {}


STAGE = Stage("eval", EvalParams, eval_units, eval_inputs, eval_run, after_ok=lambda cfg: ["score"],
              gpus=lambda cfg: 1)
