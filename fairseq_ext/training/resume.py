"""Build or resume: the model, optimizer, loss scaler and data stream a run starts from.

Three starts, tried in this order:

- ``save_dir/checkpoint_last.pt`` (resume): its weights and model cfg, and everything else a
  resumed run needs to repeat the uninterrupted one bit for bit -- update count, optimizer and
  loss-scaler state, data position, torch RNG and the best validation loss so far;
- ``spec.init`` (a seed or a branched expert): its weights, refused if its dictionary or
  architecture differ from the run's; training starts at update 0;
- neither: a random init drawn from the seeds ``setup.set_up`` set.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from launcher.contract.errors import BtmError
from fairseq_ext import checkpoint as ck

if TYPE_CHECKING:
    from fairseq_ext.streams import MixtureBlockStream
    from fairseq_ext.training.setup import TrainSetup


@dataclass
class TrainState:
    """What training changes: the model and its optimizer, the data position, the progress."""

    model: torch.nn.Module
    model_cfg: object  # the ElmConfig the model was built from (saved in every checkpoint)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for fp16; disabled otherwise
    stream: MixtureBlockStream
    update: int = 0  # updates done
    best: float | None = None  # lowest mean validation loss so far
    resumed: bool = False  # started from checkpoint_last
    saved_valid_losses: dict = field(default_factory=dict)  # checkpoint_last's, when resumed


def build_or_resume(setup: TrainSetup) -> TrainState:
    resume, init = _read_start(setup)
    start = resume if resume is not None else init
    model_cfg = _model_cfg(setup, start, from_init=resume is None)
    model = ck.build_model_from_cfg(asdict(model_cfg) | {"_name": model_cfg._name},
                                    setup.dictionary)
    if start is not None:
        model.load_state_dict(start["model"], strict=True)
    model.to(setup.ranks.device).train()
    state = TrainState(
        model=model, model_cfg=model_cfg, optimizer=make_optimizer(model, setup),
        scaler=torch.amp.GradScaler(setup.ranks.device.type, enabled=setup.precision == "fp16"),
        stream=make_stream(setup))
    if resume is not None:
        restore_progress(state, resume)
    return state


def make_optimizer(model: torch.nn.Module, setup: TrainSetup) -> torch.optim.AdamW:
    """AdamW with the preset's betas and weight decay on every parameter (as fairseq's
    ``--optimizer adam --weight-decay``); fused kernels on GPU, foreach on CPU."""
    kwargs = dict(lr=setup.lr_peak, betas=tuple(setup.preset.adam_betas), eps=1e-8,
                  weight_decay=setup.preset.weight_decay)
    kwargs["fused" if setup.ranks.device.type == "cuda" else "foreach"] = True
    return torch.optim.AdamW(model.parameters(), **kwargs)


def make_stream(setup: TrainSetup) -> MixtureBlockStream:
    """The training batches: the spec's domains mixed by its weights (or temperature)."""
    from fairseq_ext.streams import MixtureBlockStream, read_tokens
    from fairseq_ext.tasks.multidomain_lm import mixture_probs

    spec = setup.spec
    counts = [len(read_tokens(os.path.join(spec.data_dir, d, "train"))) for d in spec.domains]
    probs = mixture_probs(counts, spec.domain_weights, spec.temperature)
    return MixtureBlockStream(spec.data_dir, spec.domains, probs, setup.tokens_per_sample,
                              spec.seed)


def restore_progress(state: TrainState, resume: dict) -> None:
    """Continue where ``checkpoint_last`` left off (its weights are already loaded)."""
    saved = ck.btm_state(resume)
    state.update = ck.num_updates(resume)
    if resume.get("last_optimizer_state"):
        _load_optimizer(state.optimizer, resume["last_optimizer_state"])
    if saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    if saved.get("data_state"):
        state.stream.load_state(saved["data_state"])
    if saved.get("torch_rng") is not None:
        torch.set_rng_state(saved["torch_rng"])
    state.best = saved.get("best_valid_loss")
    state.resumed = True
    state.saved_valid_losses = saved.get("valid_losses") or {}


def _read_start(setup: TrainSetup) -> tuple[dict | None, dict | None]:
    """(checkpoint_last to resume, else None; the init checkpoint, else None)."""
    spec = setup.spec
    if setup.files.last.exists():
        return ck.load_checkpoint(setup.files.last), None
    if not spec.init:
        return None, None
    init = ck.load_checkpoint(spec.init, trust_pickle=spec.trust_init)
    stored = ck.btm_state(init).get("dictionary")
    if stored and list(stored["symbols"]) != list(setup.dictionary.symbols):
        raise BtmError(f"init checkpoint {spec.init} was trained with a different dictionary than "
                       f"{os.path.join(spec.data_dir, 'dict.txt')}")
    return None, init


def _model_cfg(setup: TrainSetup, start: dict | None, *, from_init: bool):
    """The preset's ElmConfig, overridden by the starting checkpoint's stored model cfg (the
    preset layout's MoE config when that checkpoint is a MoE of the preset's experts)."""
    from fairseq_ext.models.preset_config import model_config_for_preset

    from fairseq_ext.moe.model import moe_config, moe_layout

    preset = setup.preset
    model_cfg = model_config_for_preset(preset.name)
    model_cfg._name = preset.arch
    if start is None:
        return model_cfg
    stored = dict(start["cfg"]["model"])
    if moe_layout(stored.get("_name")) == preset.layout:
        # A MoE built from experts of this preset (fairseq_ext/moe): same shapes, MoE fields.
        model_cfg = moe_config(model_cfg, preset.layout)
    elif from_init and stored.get("_name") != preset.arch:
        raise BtmError(f"init checkpoint {setup.spec.init} is arch {stored.get('_name')!r}, "
                       f"but preset {preset.name!r} is {preset.arch!r}")
    for k, v in stored.items():
        if hasattr(model_cfg, k):
            setattr(model_cfg, k, v)
    return model_cfg


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load optimizer state but keep this machine's kernel choice (fused/foreach)."""
    keep = [{k: g.get(k) for k in ("fused", "foreach", "capturable")} for g in optimizer.param_groups]
    saved = dict(saved)
    saved["param_groups"] = [dict(g, betas=tuple(g["betas"])) for g in saved["param_groups"]]
    optimizer.load_state_dict(saved)
    for g, k in zip(optimizer.param_groups, keep):
        g.update(k)
