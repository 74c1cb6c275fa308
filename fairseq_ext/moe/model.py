"""The MoE models: an ELM of either layout whose every FFN is a ``MoeFeedForward`` block.

``elm_moe`` is the GPT-2 layout (fairseq_ext/models/elm.py), ``elm_llama_moe`` the Llama layout
(fairseq_ext/models/llama.py); everything but the FFNs is the dense layout's, so the parameter
names are the dense model's except each layer's FFN, which becomes

    decoder.layers.{i}.mlp.router.weight          [N, dim]   (no bias)
    decoder.layers.{i}.mlp.experts.{j}.<FFN name>  expert j's FFN, named as in the dense model

The MoE settings (``moe_experts``, ``moe_top_k``, ``moe_aux_loss_coef``, ``moe_train``) are
fields of the model config, so they travel in every checkpoint's ``cfg.model`` and
``load_model`` rebuilds the same model. ``moe_train: router`` freezes every parameter but the
routers (``requires_grad``), so the trainer's optimizer and gradient clipping skip them.

Training loss: ``lm_loss`` adds ``moe_aux_loss_coef x`` the layers' mean load-balancing loss
per target token, in training mode only; evaluation and scoring see the plain LM loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.models import register_model

from fairseq_ext.models.elm import ChunkedLossLM, ElmConfig, ElmDecoder, ElmMLP
from fairseq_ext.models.llama import LlamaElmConfig, LlamaElmDecoder, SwiGLU
from fairseq_ext.moe.layer import MoeFeedForward
from fairseq_ext.streams import IGNORED_TARGET

# layout -> the registered MoE model name
MOE_MODELS = {"gpt2": "elm_moe", "llama": "elm_llama_moe"}
TRAINABLE = ("router", "all")


@dataclass
class MoeSettings(FairseqDataclass):
    moe_experts: int = field(default=2, metadata={"help": "experts (FFNs) per layer"})
    moe_top_k: int = field(default=2, metadata={"help": "experts each token is routed to"})
    moe_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "weight of the load-balancing loss in training"})
    moe_train: str = field(
        default="all", metadata={"help": "router: train only the routers; all: every parameter"})


@dataclass
class ElmMoeConfig(ElmConfig, MoeSettings):
    pass


@dataclass
class LlamaMoeConfig(LlamaElmConfig, MoeSettings):
    pass


def check_settings(cfg) -> None:
    """ValueError naming the setting when the MoE settings do not describe a model."""
    if cfg.moe_experts < 2:
        raise ValueError(f"moe_experts is {cfg.moe_experts}: a MoE needs at least 2 experts")
    if not 1 <= cfg.moe_top_k <= cfg.moe_experts:
        raise ValueError(f"moe_top_k is {cfg.moe_top_k}: it must be in 1..{cfg.moe_experts} "
                         "(the number of experts)")
    if cfg.moe_train not in TRAINABLE:
        raise ValueError(f"moe_train is {cfg.moe_train!r}: it must be one of {', '.join(TRAINABLE)}")
    if not cfg.moe_aux_loss_coef >= 0:
        raise ValueError(f"moe_aux_loss_coef is {cfg.moe_aux_loss_coef}: it must be >= 0")


def _make_moe(decoder, cfg, make_ffn) -> None:
    """Replace every layer's FFN by a MoE block; freeze all but the routers if asked."""
    check_settings(cfg)
    for layer in decoder.layers:
        layer.mlp = MoeFeedForward(cfg.decoder_embed_dim, cfg.moe_experts, cfg.moe_top_k, make_ffn)
        torch.nn.init.zeros_(layer.mlp.router.weight)
    if cfg.moe_train == "router":
        for name, param in decoder.named_parameters():
            param.requires_grad = ".mlp.router." in name


class ElmMoeDecoder(ElmDecoder):
    def __init__(self, cfg: ElmMoeConfig, dictionary):
        super().__init__(cfg, dictionary)
        _make_moe(self, cfg, lambda: ElmMLP(cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim))


class LlamaMoeDecoder(LlamaElmDecoder):
    def __init__(self, cfg: LlamaMoeConfig, dictionary):
        super().__init__(cfg, dictionary)
        _make_moe(self, cfg, lambda: SwiGLU(cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim))


class MoeLM(ChunkedLossLM):
    """The chunked-loss LM plus, in training, the load-balancing loss (module docstring)."""

    def lm_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = super().lm_loss(tokens, targets)
        coef = self.decoder.cfg.moe_aux_loss_coef
        if self.training and coef:
            aux = torch.stack([layer.mlp.last_aux_loss for layer in self.decoder.layers]).mean()
            loss = loss + coef * aux * (targets != IGNORED_TARGET).sum()
        return loss

    def moe_blocks(self) -> list[MoeFeedForward]:
        return [layer.mlp for layer in self.decoder.layers]


@register_model(MOE_MODELS["gpt2"], dataclass=ElmMoeConfig)
class ElmMoeModel(MoeLM):
    config_class = ElmMoeConfig
    decoder_class = ElmMoeDecoder


@register_model(MOE_MODELS["llama"], dataclass=LlamaMoeConfig)
class LlamaMoeModel(MoeLM):
    config_class = LlamaMoeConfig
    decoder_class = LlamaMoeDecoder


MOE_CONFIGS = {"gpt2": ElmMoeConfig, "llama": LlamaMoeConfig}


def moe_layout(model_name: str | None) -> str | None:
    """The layout of a MoE model name (``cfg.model._name``), None for any other model."""
    return next((layout for layout, name in MOE_MODELS.items() if name == model_name), None)


def moe_config(dense_cfg, layout: str, **moe):
    """The MoE config of ``layout`` with the dense config's settings and the ``moe`` fields."""
    cls = MOE_CONFIGS[layout]
    cfg = cls(**{k: getattr(dense_cfg, k) for k in cls.__dataclass_fields__
                 if k != "_name" and hasattr(dense_cfg, k)})
    for key, value in moe.items():
        setattr(cfg, key, value)
    cfg._name = MOE_MODELS[layout]
    return cfg
