"""The dense baseline: one model trained for the whole budget (all updates, all GPUs) on a mix
of the training domains (``data.mixture``), from random init."""
from __future__ import annotations

from launcher.config import Config
from launcher.contract.layout import DENSE
from launcher.stages.base import Budget, Ctx, Stage, units_of
from launcher.stages.seed import MixtureTrainParams, mixture_inputs
from launcher.stages.training import (base_domains, dense_tokens_per_update, train_fields, train_unit,
                                      upstream_of_training)


def dense_units(cfg: Config):
    fields = train_fields(cfg, DENSE, base_domains(cfg), None, cfg.total_updates, dense_tokens_per_update(cfg))
    return units_of([(None, MixtureTrainParams(**fields, mixture=cfg.data.mixture))])


def dense_run(ctx: Ctx):
    return train_unit(ctx, ctx.model_dir(DENSE), None, mixture=ctx.params.mixture)


def dense_budget(cfg: Config) -> Budget:
    return Budget(cfg.total_updates, cfg.total_gpus, cfg.total_updates * dense_tokens_per_update(cfg))


STAGE = Stage("dense", MixtureTrainParams, dense_units, mixture_inputs, dense_run,
              after_ok=upstream_of_training, enabled=lambda cfg: "dense" in cfg.baselines,
              gpus=lambda cfg: cfg.total_gpus, budget=dense_budget, trains=True)
