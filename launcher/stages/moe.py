"""The moe stage (Branch-Train-MiX): the forest turned into one Mixture-of-Experts model and
trained, after merge. One unit, one job on all of the budget's GPUs (torchrun inside the node).

``build_moe_init`` writes ``RUN/moe/init.pt`` from the forest (fairseq_ext/moe/build.py: each
layer's FFNs become the experts of that layer, the rest is averaged with uniform or posterior
weights, the router starts from zero or from data); the trainer then trains it like any model
(``train_unit``: the balanced mix of the training domains, ``moe.budget_share`` of the budget's
updates, resume and preemption as every training stage). ``btm moe RUN_DIR`` runs this stage's
unit, so the CLI and the pipeline share one code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.contract.forest import Forest, verified_checkpoints
from launcher.contract.layout import MOE
from launcher.stages.base import Budget, Ctx, Stage, device, need, units_of
from launcher.stages.evaluation import prior_fields, prior_settings
from launcher.stages.seed import MixtureTrainParams
from launcher.stages.training import (base_domains, dense_tokens_per_update, moe_updates,
                                      train_fields, train_unit)


@dataclass(frozen=True)
class MoeParams(MixtureTrainParams):
    """The MoE's training run plus how it is built (config section ``moe``)."""
    experts: list[str]  # the forest's experts, in slot order
    top_k: int
    router_init: str
    weights: str
    train: str
    aux_loss_coef: float
    # The cached prior behind ``weights: posterior`` (config section ``evaluation``), so the MoE
    # averages with the prior the ensembles use.
    prior_estimator: str
    prior_block_tokens: int  # block_end's blocks: the preset's tokens_per_sample, as in eval
    prior_temperatures: list[float]


def moe_units(cfg: Config):
    m = cfg.moe
    fields = train_fields(cfg, MOE, base_domains(cfg), "forest", moe_updates(cfg),
                          dense_tokens_per_update(cfg))
    return units_of([(None, MoeParams(**fields, mixture="balanced", experts=list(cfg.expert_names),
                                      top_k=m.top_k, router_init=m.router_init, weights=m.weights,
                                      train=m.train, aux_loss_coef=m.aux_loss_coef,
                                      **prior_fields(cfg)))])


def moe_inputs(ctx: Ctx) -> list[Path]:
    """The base experts' checkpoints (the build reads only those) and the mix's splits. Not
    forest.json: the grow stage adds incremental experts to it after merge, which must not make
    the MoE of the base forest stale."""
    p = ctx.params
    return [ctx.data_dir / "dict.txt",
            *ctx.layout.split_files(p.domains, ("train", "valid")),
            *(ctx.layout.checkpoint(name) for name in p.experts)]


def build_moe_init(ctx: Ctx, save_dir: Path) -> tuple[Path, dict]:
    """``save_dir/init.pt``, the untrained MoE of the forest, and its build info."""
    init = save_dir / "init.pt"
    if (save_dir / "checkpoint_last.pt").exists() and init.exists():
        # Resuming (requeue): the trainer continues from checkpoint_last; init.pt is kept.
        return init, need("fairseq_ext.moe.build", "moe_info")(init)
    build = need("fairseq_ext.moe.build", "build_moe")
    MoeSpec = need("fairseq_ext.moe.build", "MoeSpec")
    RouterSample = need("fairseq_ext.moe.router_init", "RouterSample")
    p = ctx.params
    forest_experts = verified_checkpoints(ctx.layout.forest)
    experts = {name: forest_experts[name] for name in p.experts}
    weights = _weights(ctx, experts)
    forest = Forest.load(ctx.layout.forest)
    sample = RouterSample(str(ctx.data_dir), [forest.get(n).domains[0] for n in p.experts])
    spec = MoeSpec(top_k=p.top_k, router_init=p.router_init, aux_loss_coef=p.aux_loss_coef,
                   train=p.train, weights=weights,
                   router_sample=sample if p.router_init == "data" else None)
    info = build(experts, init, spec, btm_extra={"weights_rule": p.weights})
    return init, info


def _weights(ctx: Ctx, experts: dict[str, Path]) -> list[float]:
    from launcher.stages.evaluation import eval_dirs

    EvalSettings = need("fairseq_ext.evaluate", "EvalSettings")
    moe_weights = need("fairseq_ext.moe.weights", "moe_weights")
    p = ctx.params
    settings = EvalSettings(methods=(), prior=prior_settings(p), device=device())
    return moe_weights(p.weights, experts, list(p.domains), eval_dirs(ctx.layout), settings)


def moe_run(ctx: Ctx):
    save_dir = ctx.model_dir(MOE)
    save_dir.mkdir(parents=True, exist_ok=True)
    init, info = build_moe_init(ctx, save_dir)
    outputs, extra = train_unit(ctx, save_dir, init, mixture=ctx.params.mixture)
    extra["moe"] = {k: info[k] for k in ("layout", "top_k", "router_init", "experts")}
    return [*outputs, init], extra


def moe_budget(cfg: Config) -> Budget:
    updates = moe_updates(cfg)
    return Budget(updates, cfg.total_gpus, updates * dense_tokens_per_update(cfg))


STAGE = Stage("moe", MoeParams, moe_units, moe_inputs, moe_run, after_ok=lambda cfg: ["merge"],
              enabled=lambda cfg: cfg.moe.enabled, gpus=lambda cfg: cfg.total_gpus,
              budget=moe_budget, trains=True)
