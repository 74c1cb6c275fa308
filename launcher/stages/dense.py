"""The dense baseline: one model trained for the whole budget (all updates, all GPUs) on a mix
of the training domains (``data.mixture``), from random init, or, with ``model.init: hf:PATH``,
from the same imported weights the seed starts from (a fair baseline: same starting point, same
compute). Then its record lists the model directory's files among the inputs, like the seed's."""
from __future__ import annotations

from launcher.config import Config
from launcher.contract.layout import DENSE
from launcher.stages.base import Budget, Ctx, Stage, units_of
from launcher.stages.seed import MixtureTrainParams, import_init, mixture_and_init_inputs
from launcher.stages.training import (base_domains, dense_tokens_per_update, train_fields, train_unit,
                                      upstream_of_training)


def dense_units(cfg: Config):
    fields = train_fields(cfg, DENSE, base_domains(cfg), cfg.model.init, cfg.total_updates,
                          dense_tokens_per_update(cfg))
    return units_of([(None, MixtureTrainParams(**fields, mixture=cfg.data.mixture))])


def dense_run(ctx: Ctx):
    save_dir = ctx.model_dir(DENSE)
    if ctx.params.init is None:
        return train_unit(ctx, save_dir, None, mixture=ctx.params.mixture)
    save_dir.mkdir(parents=True, exist_ok=True)
    # Its own import (not the seed's file): dense does not wait for the seed stage. A resumed
    # run finds the same import and continues from checkpoint_last.
    imported = ctx.layout.hf_import_of(DENSE)
    record = import_init(ctx, imported)
    outputs, extra = train_unit(ctx, save_dir, imported, mixture=ctx.params.mixture)
    return outputs, {**extra, "hf_import": record}


def dense_budget(cfg: Config) -> Budget:
    return Budget(cfg.total_updates, cfg.total_gpus, cfg.total_updates * dense_tokens_per_update(cfg))


STAGE = Stage("dense", MixtureTrainParams, dense_units, mixture_and_init_inputs, dense_run,
              after_ok=upstream_of_training, enabled=lambda cfg: "dense" in cfg.baselines,
              gpus=lambda cfg: cfg.total_gpus, budget=dense_budget, trains=True)
