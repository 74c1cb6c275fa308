"""The train stage (array): one expert per training domain (or cluster), plus the random-split
baseline's experts, each branched from the seed LM (or random init when there is no seed)."""
from __future__ import annotations

from pathlib import Path

from launcher.config import Config
from launcher.contract.layout import SEED, random_split_name
from launcher.stages.base import Ctx, Stage, units_of
from launcher.stages.training import (TrainParams, branch_from, expert_budget, expert_gpus,
                                      expert_tokens_per_batch, has_seed, split_updates, train_fields, train_unit,
                                      upstream_of_training)


def train_units(cfg: Config):
    _, expert_updates = split_updates(cfg)
    init = SEED if has_seed(cfg) else None
    names = list(cfg.expert_names)
    if "random_split" in cfg.baselines:
        # random<i>: a random 1/n of the pooled training documents (built by the data stage)
        names += [random_split_name(i) for i in range(len(cfg.expert_names))]
    tokens = expert_tokens_per_batch(cfg)
    return units_of([(name, TrainParams(**train_fields(cfg, name, [name], init, expert_updates, tokens)))
                     for name in names])


def train_inputs(ctx: Ctx) -> list[Path]:
    ins = [ctx.data_dir / "dict.txt", *ctx.layout.split_files(ctx.params.domains, ("train", "valid"))]
    if ctx.params.init == SEED:
        ins.append(ctx.layout.checkpoint(SEED))
    return ins


def train_run(ctx: Ctx):
    save_dir = ctx.model_dir(ctx.params.name)
    save_dir.mkdir(parents=True, exist_ok=True)
    init = branch_from(ctx, save_dir, {SEED: 1.0}, "seed") if ctx.params.init == SEED else None
    return train_unit(ctx, save_dir, init)


def train_after(cfg: Config) -> list[str]:
    return ["seed"] if has_seed(cfg) else upstream_of_training(cfg)


STAGE = Stage("train", TrainParams, train_units, train_inputs, train_run, after_ok=train_after,
              array=True, gpus=expert_gpus, budget=expert_budget, trains=True)
