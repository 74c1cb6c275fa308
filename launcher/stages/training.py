"""What the training stages (seed, train, dense, grow) and ``btm seed``/``btm train`` share.

The compute budget (BTM paper): the dense run is ``U`` updates on ``G`` GPUs. The seed LM
spends ``seed_fraction * U`` updates on all ``G`` GPUs; each of the ``N`` experts then trains
for the remaining updates on ``G / N`` of the GPUs (batch ``1/N`` of the dense batch), so the
forest's GPU-updates, seed included, equal the dense baseline's. With ``moe.enabled`` the MoE
stage trains ``moe.budget_share * U`` updates on all ``G`` GPUs and the experts that many fewer,
so seed + experts + MoE still equal the dense run.

``train_model`` is the one call into the trainer: the stages and the CLI verbs build their
``TrainSpec`` and go through it (one process, or torchrun over this node's GPUs).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import Config
from launcher.contract.branch_record import branch_record_path, read_branch_record
from launcher.contract.errors import BtmError
from launcher.stages.base import Budget, Ctx, Params, need


class Preempted(Exception):
    """The unit saved its state on SIGUSR2/SIGTERM; exit PREEMPTED_EXIT to be requeued."""


# ---- the budget ----------------------------------------------------------------------------

def split_updates(cfg: Config) -> tuple[int, int]:
    """(seed updates, updates of each expert)."""
    seed_updates = round(cfg.budget.seed_fraction * cfg.total_updates)
    return seed_updates, cfg.total_updates - seed_updates - moe_updates(cfg)


def moe_updates(cfg: Config) -> int:
    """Updates of the MoE stage (all ``G`` GPUs, the dense batch), taken from the experts'."""
    return round(cfg.moe.budget_share * cfg.total_updates) if cfg.moe.enabled else 0


def has_seed(cfg: Config) -> bool:
    """Whether experts branch from a seed LM: one trained here, or imported (model.init)."""
    return split_updates(cfg)[0] > 0 or cfg.model.init is not None


def dense_tokens_per_update(cfg: Config) -> int:
    return cfg.total_gpus * cfg.preset.tokens_per_update_per_gpu


def expert_gpus(cfg: Config) -> int:
    return max(1, cfg.total_gpus // len(cfg.expert_names))


def expert_budget(cfg: Config) -> Budget:
    """One expert (train or grow): the rest of the updates on its 1/N share of the GPUs."""
    _, updates = split_updates(cfg)
    n = len(cfg.expert_names)
    return Budget(updates, cfg.total_gpus / n, updates * (dense_tokens_per_update(cfg) // n))


def expert_tokens_per_batch(cfg: Config) -> int:
    return max(1, dense_tokens_per_update(cfg) // len(cfg.expert_names))


def base_domains(cfg: Config) -> list[str]:
    """What the seed LM and the dense baseline train on: the experts' domains (clusters for cbtm)."""
    return cfg.expert_names if cfg.method == "cbtm" else list(cfg.domains.train)


def upstream_of_training(cfg: Config) -> list[str]:
    """The job whose data the training stages read: the clusters (cbtm) or the data."""
    return ["cluster"] if cfg.method == "cbtm" else ["data"]


# ---- parameters ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainParams(Params):
    """One training run of a stage (the keys of its record's params)."""
    name: str
    domains: list[str]
    init: str | None  # "seed", a branching rule (grow), "hf:PATH" (seed, dense), None for random init
    preset: str
    max_updates: int
    tokens_per_batch: int
    seed: int
    save_interval_updates: int


def train_fields(cfg: Config, name: str, domains: list[str], init: str | None, updates: int,
                 tokens_per_batch: int) -> dict:
    return dict(name=name, domains=list(domains), init=init, preset=cfg.model.preset, max_updates=updates,
                tokens_per_batch=tokens_per_batch, seed=cfg.seed,
                save_interval_updates=min(cfg.budget.save_interval_updates, max(updates, 1)))


def domain_mixture(mixture: Any, n_domains: int) -> tuple[list[float] | None, float]:
    """``data.mixture`` as TrainSpec's (domain_weights, temperature).

    balanced: equal weights; proportional: sample by tokens (temperature 1);
    {temperature: T}: p_i ∝ tokens_i^(1/T)."""
    if mixture == "balanced":
        return [1.0] * n_domains, 1.0
    if mixture == "proportional":
        return None, 1.0
    return None, float(mixture["temperature"])


# ---- running the trainer -------------------------------------------------------------------

def accumulation_steps(tokens_per_batch: int, preset_name: str, nproc: int) -> int:
    """Micro-batches per update so that no process holds more than the preset's per-GPU batch.

    The batch is the budget's (all of the run's nominal GPUs); a job with fewer GPUs (a seed
    or dense run whose budget names more GPUs than one node has) accumulates instead of
    growing each GPU's share. The result does not depend on it (fairseq_ext/train.py).
    """
    from launcher.contract.presets import get_preset

    preset = get_preset(preset_name)
    sequences = tokens_per_batch // preset.tokens_per_sample
    least = max(1, math.ceil(sequences / (nproc * preset.sequences_per_gpu)))
    for steps in range(least, max(sequences // nproc, least) + 1):
        if sequences % (nproc * steps) == 0:
            return steps
    return least  # no even split: the trainer names the numbers


def train_model(spec, nproc: int = 1, nodes: int = 1):
    """Train ``spec`` (a fairseq_ext.train.TrainSpec) on ``nproc`` processes of this node, or of
    each of ``nodes`` nodes of this SLURM job (srun tasks, fairseq_ext/multinode.py); returns the
    TrainResult (``preempted`` set when it saved on SIGUSR2/SIGTERM)."""
    if nproc < 1:
        raise BtmError(f"--nproc-per-node must be >= 1, got {nproc}")
    if nodes < 1:
        raise BtmError(f"--nodes must be >= 1, got {nodes}")
    if nodes > 1:
        return need("fairseq_ext.multinode", "train_lm_srun")(spec, nodes, nproc)
    if nproc > 1:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise BtmError("--nproc-per-node starts torchrun itself; do not run it under torchrun")
        return need("fairseq_ext.multiproc", "train_lm_torchrun")(spec, nproc)
    return need("fairseq_ext.train", "train_lm")(spec)  # one rank of a group when started by torchrun


def train_unit(ctx: Ctx, save_dir: Path, init: Path | None, mixture: Any = None):
    """Train the unit's model into ``save_dir``; -> (outputs, extra record fields).

    ``mixture`` (seed, dense): the config's data.mixture; None: TrainSpec's default (one domain)."""
    TrainSpec = need("fairseq_ext.train", "TrainSpec")
    p = ctx.params
    weights, temperature = domain_mixture(mixture, len(p.domains)) if mixture is not None else (None, 1.0)
    spec = TrainSpec(data_dir=str(ctx.data_dir), domains=list(p.domains), save_dir=str(save_dir),
                     preset=p.preset, domain_weights=weights, temperature=temperature,
                     init=str(init) if init else None, max_updates=p.max_updates,
                     save_interval_updates=p.save_interval_updates, tokens_per_batch=p.tokens_per_batch,
                     update_freq=accumulation_steps(p.tokens_per_batch, p.preset, ctx.nproc * ctx.nodes),
                     seed=p.seed, device=os.environ.get("BTM_DEVICE", "auto"),
                     # from the config, not the unit's params: the events change no result
                     tensorboard=ctx.config.training.tensorboard)
    resumed = _resume_point(save_dir)
    result = train_model(spec, ctx.nproc, ctx.nodes)
    if result.preempted:
        raise Preempted()
    outs = [save_dir / "checkpoint_last.pt", save_dir / "checkpoint_best.pt"]
    extra = {"train": {"num_updates": result.num_updates, "tokens": result.num_updates * p.tokens_per_batch,
                       "valid_losses": result.valid_losses, "best_valid_loss": result.best_valid_loss,
                       "tokens_per_second": result.tokens_per_second, "resumed": resumed}}
    return [o for o in outs if o.exists()], extra


def _resume_point(save_dir: Path) -> dict | None:
    """Where a resumed run picks up: checkpoint_last exists; last update in train_log.jsonl."""
    if not (save_dir / "checkpoint_last.pt").exists():
        return None
    rows = need("fairseq_ext.training.save_dir", "read_train_log")(save_dir)
    updates = [row["update"] for row in rows if isinstance(row.get("update"), int)]
    return {"checkpoint_last_existed": True, "last_logged_update": max(updates, default=0)}


# ---- branching -----------------------------------------------------------------------------

def branch_from(ctx: Ctx, save_dir: Path, parents: dict[str, float], method: str) -> Path:
    """``init.pt`` = the weighted average of the parents (names -> weights); branch.json by branch_expert."""
    branch_expert = need("fairseq_ext.branch", "branch_expert")
    init = save_dir / "init.pt"
    if (save_dir / "checkpoint_last.pt").exists() and init.exists():
        return init  # resuming (requeue): the trainer continues from checkpoint_last
    paths = {str(ctx.layout.checkpoint(n)): w for n, w in parents.items()}
    branch_expert(paths, str(init), method=method, info={"parent_names": parents})
    return init


def parents_by_name(save_dir: Path) -> dict[str, float]:
    """The parents (names -> weights) an expert was branched from, from its branch.json.

    Every branched expert has one (branch_expert writes it beside init.pt); a missing or
    unreadable one is an error, not "no parents": forest.json would record a wrong lineage."""
    path = branch_record_path(save_dir)
    fix = f"delete {save_dir} and run `btm run` again: the stage branches the expert anew and retrains it"
    try:
        record = read_branch_record(save_dir)
    except BtmError as e:
        raise BtmError(f"{e}; {fix}") from None
    if record is None:
        raise BtmError(f"{path} is missing: expert {save_dir.name!r} has no record of its parents; {fix}")
    parents = record.get("parent_names")
    try:
        if not isinstance(parents, dict):
            raise ValueError("it has no 'parent_names' mapping")
        return {str(n): float(w) for n, w in parents.items()}
    except (ValueError, TypeError) as e:
        raise BtmError(f"{path} is unreadable ({e}); {fix}") from None
