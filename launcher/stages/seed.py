"""The seed stage (BTM step 0): the seed LM on all of the budget's GPUs, trained on a mix of
the training domains (``data.mixture``; balanced by default, as in the BTM paper)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import Config
from launcher.contract.layout import SEED
from launcher.stages.base import Budget, Ctx, Stage, units_of
from launcher.stages.training import (TrainParams, base_domains, dense_tokens_per_update, split_updates,
                                      train_fields, train_unit, upstream_of_training)


@dataclass(frozen=True)
class MixtureTrainParams(TrainParams):
    """A run over several domains (seed, dense): how it samples them (config data.mixture)."""
    mixture: Any  # "balanced" | "proportional" | {"temperature": T}


def seed_units(cfg: Config):
    seed_updates, _ = split_updates(cfg)
    fields = train_fields(cfg, SEED, base_domains(cfg), None, seed_updates, dense_tokens_per_update(cfg))
    return units_of([(None, MixtureTrainParams(**fields, mixture=cfg.data.mixture))])


def mixture_inputs(ctx: Ctx) -> list[Path]:
    return [ctx.data_dir / "dict.txt", *ctx.layout.split_files(ctx.params.domains, ("train", "valid"))]


def seed_run(ctx: Ctx):
    return train_unit(ctx, ctx.model_dir(SEED), None, mixture=ctx.params.mixture)


def seed_budget(cfg: Config) -> Budget:
    seed_updates, _ = split_updates(cfg)
    return Budget(seed_updates, cfg.total_gpus, seed_updates * dense_tokens_per_update(cfg))


STAGE = Stage("seed", MixtureTrainParams, seed_units, mixture_inputs, seed_run,
              after_ok=upstream_of_training, enabled=lambda cfg: split_updates(cfg)[0] > 0,
              gpus=lambda cfg: cfg.total_gpus, budget=seed_budget, trains=True)
