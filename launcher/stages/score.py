"""The score stage (array, one unit per model, loaded once): the per-token log-probs of every
eval domain, cached where the eval stage's mixing reads them (same cache key)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.contract import methods
from launcher.contract.layout import DENSE, MOE, random_split_name
from launcher.stages.base import Ctx, Params, Stage, device, need, units_of

PRIOR_SPLIT = "valid"  # the cached domain prior is estimated on held-out data (fairseq_ext.priors)


@dataclass(frozen=True)
class ScoreParams(Params):
    model: str
    domains: list[str]
    splits: list[str]  # the eval split, plus the prior split for experts when a method needs it


def scored_models(cfg: Config) -> list[str]:
    models = [*cfg.expert_names, *cfg.domains.incremental]
    if "random_split" in cfg.baselines:
        models += [random_split_name(i) for i in range(len(cfg.expert_names))]
    if "dense" in cfg.baselines:
        models.append(DENSE)
    if cfg.moe.enabled:
        models.append(MOE)
    return models


def score_units(cfg: Config):
    needs_prior = methods.needs_prior(cfg.evaluation.methods) and cfg.evaluation.split != PRIOR_SPLIT
    experts = {*cfg.expert_names, *cfg.domains.incremental}
    return units_of([(m, ScoreParams(m, list(cfg.domains.eval),
                                     [cfg.evaluation.split, *([PRIOR_SPLIT] if needs_prior and m in experts else [])]))
                     for m in scored_models(cfg)])


def score_inputs(ctx: Ctx) -> list[Path]:
    p = ctx.params
    return [ctx.layout.checkpoint(p.model), *ctx.layout.split_files(p.domains, p.splits)]


def score_run(ctx: Ctx):
    score_split = need("fairseq_ext.scoring", "score_split")
    p = ctx.params
    outputs, tokens, passes = [], 0, 0
    for domain in p.domains:
        for split in p.splits:
            scores = score_split(str(ctx.layout.checkpoint(p.model)), str(ctx.data_dir), domain, split,
                                 cache_dir=str(ctx.layout.scores), device=device())
            outputs.append(Path(scores.path))
            tokens += int(len(scores.logprobs))
            passes += scores.forward_passes
    return outputs, {"tokens": tokens, "forward_passes": passes}


def score_after(cfg: Config) -> list[str]:
    return ["grow" if cfg.domains.incremental else "merge", *(["dense"] if "dense" in cfg.baselines else []),
            *(["moe"] if cfg.moe.enabled else [])]


STAGE = Stage("score", ScoreParams, score_units, score_inputs, score_run, after_ok=score_after, array=True,
              gpus=lambda cfg: 1)
