"""The seed stage (BTM step 0): the seed LM on all of the budget's GPUs, trained on a mix of
the training domains (``data.mixture``; balanced by default, as in the BTM paper).

With ``model.init: hf:PATH`` the seed starts from that local transformers model, converted
exactly (``fairseq_ext.hf_import``), instead of random init: it trains on for
``budget.seed_fraction`` of the budget, or, with ``seed_fraction: 0``, the imported model is
the seed as it is (what c-BTM and Branch-Train-MiX do) and the experts get the whole budget.
The record lists the model directory's files (sha256) among the inputs: another model there
makes a new seed. ``model.trust_checkpoint`` lets the import read pickle-only weights. The
dense baseline starts from the same import (``launcher.stages.dense``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import Config
from launcher.contract.hf_model import hf_dir, hf_files
from launcher.contract.layout import SEED
from launcher.stages.base import Budget, Ctx, Stage, need, units_of
from launcher.stages.training import (TrainParams, base_domains, dense_tokens_per_update, has_seed,
                                      split_updates, train_fields, train_unit, upstream_of_training)


@dataclass(frozen=True)
class MixtureTrainParams(TrainParams):
    """A run over several domains (seed, dense): how it samples them (config data.mixture)."""
    mixture: Any  # "balanced" | "proportional" | {"temperature": T}


def seed_units(cfg: Config):
    seed_updates, _ = split_updates(cfg)
    fields = train_fields(cfg, SEED, base_domains(cfg), cfg.model.init, seed_updates,
                          dense_tokens_per_update(cfg))
    return units_of([(None, MixtureTrainParams(**fields, mixture=cfg.data.mixture))])


def mixture_inputs(ctx: Ctx) -> list[Path]:
    return [ctx.data_dir / "dict.txt", *ctx.layout.split_files(ctx.params.domains, ("train", "valid"))]


def mixture_and_init_inputs(ctx: Ctx) -> list[Path]:
    """The data, and every file of the model directory a run imports (``init: hf:PATH``)."""
    source = hf_dir(ctx.params.init)
    return [*mixture_inputs(ctx), *(hf_files(source) if source else [])]


def import_init(ctx: Ctx, out: Path) -> dict:
    """Import ``init: hf:PATH`` into ``out`` (the unit's starting point); the import record."""
    import_hf = need("fairseq_ext.hf_import", "import_hf")
    return import_hf(hf_dir(ctx.params.init), out, preset=ctx.params.preset, data_dir=ctx.data_dir,
                     trust_pickle=ctx.config.model.trust_checkpoint)


def train_mixture_model(ctx: Ctx, name: str):
    """Train model ``name`` (the seed, dense) on the unit's mixture from random init, or from its
    own import of ``init: hf:PATH`` (a resumed run finds the same import and continues from
    checkpoint_last); with an import, the extra record says what was imported."""
    save_dir = ctx.model_dir(name)
    if ctx.params.init is None:
        return train_unit(ctx, save_dir, None, mixture=ctx.params.mixture)
    save_dir.mkdir(parents=True, exist_ok=True)
    imported = ctx.layout.hf_import_of(name)
    record = import_init(ctx, imported)
    outputs, extra = train_unit(ctx, save_dir, imported, mixture=ctx.params.mixture)
    return outputs, {**extra, "hf_import": record}


def seed_run(ctx: Ctx):
    if ctx.params.init is not None and ctx.params.max_updates == 0:
        # As is: the import is the seed's checkpoint.
        ctx.model_dir(SEED).mkdir(parents=True, exist_ok=True)
        imported = ctx.layout.checkpoint(SEED)
        return [imported], {"hf_import": import_init(ctx, imported)}
    return train_mixture_model(ctx, SEED)


def seed_gpus(cfg: Config) -> int:
    return cfg.total_gpus if split_updates(cfg)[0] > 0 else 0  # importing as is needs none


def seed_budget(cfg: Config) -> Budget:
    seed_updates, _ = split_updates(cfg)
    return Budget(seed_updates, cfg.total_gpus, seed_updates * dense_tokens_per_update(cfg))


STAGE = Stage("seed", MixtureTrainParams, seed_units, mixture_and_init_inputs, seed_run,
              after_ok=upstream_of_training, enabled=has_seed, gpus=seed_gpus, budget=seed_budget,
              trains=True)
