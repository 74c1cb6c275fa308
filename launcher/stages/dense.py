"""The dense baseline: one model trained for the whole budget (all updates, all GPUs) on a mix
of the training domains (``data.mixture``), from random init, or, with ``model.init: hf:PATH``,
from the same imported weights the seed starts from (a fair baseline: same starting point, same
compute). Then its record lists the model directory's files among the inputs, like the seed's."""
from __future__ import annotations

from launcher.config import Config
from launcher.contract.layout import DENSE
from launcher.stages.base import Budget, Ctx, Stage, units_of
from launcher.stages.seed import MixtureTrainParams, mixture_and_init_inputs, train_mixture_model
from launcher.stages.training import (base_domains, dense_tokens_per_update, train_fields,
                                      upstream_of_training)


def dense_units(cfg: Config):
    fields = train_fields(cfg, DENSE, base_domains(cfg), cfg.model.init, cfg.total_updates,
                          dense_tokens_per_update(cfg))
    return units_of([(None, MixtureTrainParams(**fields, mixture=cfg.data.mixture))])


def dense_run(ctx: Ctx):
    # With an import, dense makes its own (not the seed's file): it does not wait for the seed.
    return train_mixture_model(ctx, DENSE)


def dense_budget(cfg: Config) -> Budget:
    return Budget(cfg.total_updates, cfg.total_gpus, cfg.total_updates * dense_tokens_per_update(cfg))


STAGE = Stage("dense", MixtureTrainParams, dense_units, mixture_and_init_inputs, dense_run,
              after_ok=upstream_of_training, enabled=lambda cfg: "dense" in cfg.baselines,
              gpus=lambda cfg: cfg.total_gpus, budget=dense_budget, trains=True)
