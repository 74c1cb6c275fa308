"""The grow stage (array, incremental BTM): each incremental domain's expert is branched from
the seed or from the posterior-weighted top-k experts of the forest, trained, and added to
forest.json."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.contract.forest import editing
from launcher.contract.layout import SEED
from launcher.stages.base import Ctx, Stage, device, need, units_of
from launcher.stages.training import (TrainParams, branch_from, expert_budget, expert_gpus,
                                      expert_tokens_per_batch, parents_by_name, split_updates, train_fields,
                                      train_unit)


@dataclass(frozen=True)
class GrowParams(TrainParams):
    top_k: int
    sample_docs: int  # documents of the new domain that estimate the posterior
    parents: list[str]  # the experts it may branch from


def grow_units(cfg: Config):
    _, expert_updates = split_updates(cfg)
    tokens = expert_tokens_per_batch(cfg)
    b = cfg.branching
    return units_of([(d, GrowParams(**train_fields(cfg, d, [d], b.rule, expert_updates, tokens),
                                    top_k=b.top_k, sample_docs=b.sample_docs, parents=list(cfg.expert_names)))
                     for d in cfg.domains.incremental])


def grow_inputs(ctx: Ctx) -> list[Path]:
    p = ctx.params
    ins = [ctx.data_dir / "dict.txt", *ctx.layout.split_files(p.domains, ("train", "valid"))]
    if p.init == SEED:
        return [*ins, ctx.layout.checkpoint(SEED)]
    return [*ins, *[ctx.layout.checkpoint(n) for n in p.parents]]


def _choose_parents(ctx: Ctx, save_dir: Path) -> tuple[dict[str, float], str]:
    """(parent names -> weights, branching method) of the new expert."""
    p = ctx.params
    if p.init == SEED:
        return {SEED: 1.0}, "seed"
    if (save_dir / "checkpoint_last.pt").exists():
        return parents_by_name(save_dir), "posterior"  # resuming: keep the parents it started from
    branch_weights = need("fairseq_ext.priors", "branch_weights")
    ckpts = {n: str(ctx.layout.checkpoint(n)) for n in p.parents}
    weights = branch_weights(ckpts, str(ctx.data_dir), p.name, "train", p.sample_docs, p.top_k,
                             cache_dir=str(ctx.layout.scores), device=device())
    return {n: float(w) for n, w in weights.items() if w > 0}, "posterior"


def grow_run(ctx: Ctx):
    name = ctx.params.name
    save_dir = ctx.model_dir(name)
    save_dir.mkdir(parents=True, exist_ok=True)
    parents, method = _choose_parents(ctx, save_dir)
    init = branch_from(ctx, save_dir, parents, method)
    outs, extra = train_unit(ctx, save_dir, init)
    with editing(ctx.layout.forest, ctx.config.name) as forest:
        forest.add(name, list(ctx.params.domains), save_dir / "checkpoint_last.pt", parents=parents,
                   updates=extra["train"]["num_updates"], tokens=extra["train"]["tokens"],
                   metrics={"valid_losses": extra["train"]["valid_losses"]}, replace=True)
    return [*outs, save_dir / "branch.json"], {**extra, "parents": parents}


STAGE = Stage("grow", GrowParams, grow_units, grow_inputs, grow_run,
              after_ok=lambda cfg: ["merge", "data_incremental"], array=True,
              enabled=lambda cfg: bool(cfg.domains.incremental), gpus=expert_gpus, budget=expert_budget,
              trains=True)
