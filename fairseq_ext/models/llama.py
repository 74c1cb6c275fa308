"""The Llama-layout ELM: a second expert architecture beside the paper's GPT-2 layout (elm.py).

Layout is exactly Hugging Face ``LlamaForCausalLM``'s, so that import and export are renames
(fairseq_ext/hf_import.py, fairseq_ext/export_llama.py): pre-RMSNorm blocks, rotary position
embeddings on q and k (HF's "rotate half" convention, ``rope_theta`` configurable, Llama 3's rope
scaling optional), SwiGLU MLP
``down(silu(gate(x)) * up(x))``, no biases anywhere, grouped-query attention (``decoder_kv_heads``
key/value heads, each shared by ``heads / kv_heads`` consecutive query heads), a final RMSNorm and
an output projection that is the input embedding (``tie_embeddings``) or its own matrix.
Parameter names map one to one:

    decoder.embed_tokens              -> model.embed_tokens
    decoder.layers.{i}.<same name>    -> model.layers.{i}.<same name>
    decoder.norm                      -> model.norm
    decoder.output_projection         -> lm_head                (untied only)

The fast path is the GPT-2 ELM's: ``F.scaled_dot_product_attention(is_causal=True)`` and
``lm_loss`` through elm.py's chunked cross-entropy (never the full fp32 logits); the trainer's
bf16 autocast and ``torch.compile`` wrap it unchanged. As in elm.py there is no key/value cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.models import (
    FairseqDecoder,
    register_model,
    register_model_architecture,
)

from fairseq_ext.models.elm import ChunkedLossLM
from launcher.contract.presets import LAYOUT_MODELS, PRESETS

MODEL_NAME = LAYOUT_MODELS["llama"]


@dataclass
class LlamaElmConfig(FairseqDataclass):
    decoder_layers: int = field(default=2, metadata={"help": "number of transformer blocks"})
    decoder_embed_dim: int = field(default=64, metadata={"help": "model (embedding) dimension"})
    decoder_attention_heads: int = field(default=4, metadata={"help": "query heads"})
    decoder_kv_heads: int = field(
        default=4, metadata={"help": "key/value heads (grouped-query attention); divides heads"})
    decoder_ffn_embed_dim: int = field(default=176, metadata={"help": "SwiGLU hidden dimension"})
    max_target_positions: int = field(
        default=128, metadata={"help": "longest sequence the model accepts (= tokens_per_sample)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary embedding base"})
    rope_llama3_factor: float = field(
        default=0.0, metadata={"help": "Llama 3's rope scaling factor (rope_type llama3); 0 = none"})
    rope_llama3_low_freq_factor: float = field(default=1.0, metadata={"help": "llama3 rope scaling"})
    rope_llama3_high_freq_factor: float = field(default=4.0, metadata={"help": "llama3 rope scaling"})
    rope_llama3_original_positions: int = field(
        default=8192, metadata={"help": "llama3 rope scaling: original_max_position_embeddings"})
    rms_norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    tie_embeddings: bool = field(
        default=True, metadata={"help": "output projection is the input embedding"})
    dropout: float = field(default=0.0, metadata={"help": "embedding/residual dropout"})
    attention_dropout: float = field(default=0.0, metadata={"help": "attention-prob dropout"})
    loss_chunk_tokens: int = field(
        default=4096, metadata={"help": "positions per chunk in the chunked cross-entropy"})
    checkpoint_activations: bool = field(
        default=False, metadata={"help": "recompute block activations in backward (saves memory)"})


class RMSNorm(nn.Module):
    """HF Llama's RMSNorm: normalize in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_inv_freq(cfg: LlamaElmConfig, device) -> torch.Tensor:
    """The rotary frequencies [head_dim / 2] (fp32), computed as HF does, with Llama 3's
    rescaling (``rope_type: llama3``) when ``rope_llama3_factor`` is set."""
    head_dim = cfg.decoder_embed_dim // cfg.decoder_attention_heads
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    factor = cfg.rope_llama3_factor
    if not factor:
        return inv_freq
    # Long wavelengths are divided by factor, short ones kept, the ones between interpolated.
    low, high = cfg.rope_llama3_low_freq_factor, cfg.rope_llama3_high_freq_factor
    original = cfg.rope_llama3_original_positions
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(seq: int, inv_freq: torch.Tensor):
    """cos and sin [seq, head_dim] (fp32) of positions 0..seq-1."""
    freqs = torch.outer(torch.arange(seq, device=inv_freq.device, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [batch, heads, seq, head_dim] by position ("rotate half": pairs (i, i + d/2))."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaElmConfig):
        super().__init__()
        dim, heads, kv_heads = cfg.decoder_embed_dim, cfg.decoder_attention_heads, cfg.decoder_kv_heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"embed dim {dim}, {heads} heads and {kv_heads} kv heads do not divide")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True,
            enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(y.transpose(1, 2).reshape(bsz, seq, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaElmConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.decoder_embed_dim, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.decoder_embed_dim, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class LlamaElmDecoder(FairseqDecoder):
    def __init__(self, cfg: LlamaElmConfig, dictionary):
        super().__init__(dictionary)
        self.cfg = cfg
        dim = cfg.decoder_embed_dim
        self.padding_idx = dictionary.pad()
        self.embed_tokens = nn.Embedding(len(dictionary), dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.decoder_layers))
        self.norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.output_projection = None if cfg.tie_embeddings else nn.Linear(dim, len(dictionary), bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """HF Llama's initialization: N(0, 0.02) for every matrix, norms at one."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.output_projection is None else self.output_projection.weight

    def extract_features(self, prev_output_tokens, **unused):
        seq = prev_output_tokens.shape[1]
        if seq > self.cfg.max_target_positions:
            raise ValueError(f"sequence of {seq} tokens is longer than the model's "
                             f"{self.cfg.max_target_positions} positions")
        x = self.dropout(self.embed_tokens(prev_output_tokens))
        cos, sin = rotary_cos_sin(seq, rotary_inv_freq(self.cfg, x.device))
        for layer in self.layers:
            if self.cfg.checkpoint_activations and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x), {"attn": [None], "inner_states": []}

    def output_layer(self, features, **unused):
        return F.linear(features, self.output_weight())

    def forward(self, prev_output_tokens, src_lengths=None, features_only=False, **kwargs):
        x, extra = self.extract_features(prev_output_tokens)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def max_positions(self):
        return self.cfg.max_target_positions


@register_model(MODEL_NAME, dataclass=LlamaElmConfig)
class LlamaElmModel(ChunkedLossLM):
    """Llama-layout decoder-only LM (see the module docstring)."""

    config_class = LlamaElmConfig
    decoder_class = LlamaElmDecoder


# Preset.rope_llama3's four numbers, in order, and HF's rope_parameters keys for them.
LLAMA3_ROPE_FIELDS = ("rope_llama3_factor", "rope_llama3_low_freq_factor",
                      "rope_llama3_high_freq_factor", "rope_llama3_original_positions")
LLAMA3_ROPE_HF_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings")


def _preset_values(preset) -> dict:
    return {"decoder_layers": preset.layers, "decoder_embed_dim": preset.embed_dim,
            "decoder_attention_heads": preset.heads, "decoder_kv_heads": preset.key_value_heads,
            "decoder_ffn_embed_dim": preset.ffn_dim, "max_target_positions": preset.tokens_per_sample,
            "rope_theta": preset.rope_theta, "rms_norm_eps": preset.norm_eps,
            **dict(zip(LLAMA3_ROPE_FIELDS, preset.rope_llama3 or (0.0,))),
            "tie_embeddings": preset.tie_embeddings, "dropout": preset.dropout,
            "attention_dropout": preset.dropout}


def _preset_arch(preset):
    def arch(cfg):
        # Keep values that are already set (from a checkpoint's cfg or the command line).
        for key, value in _preset_values(preset).items():
            if getattr(cfg, key, None) is None:
                setattr(cfg, key, value)
        for key, default in LlamaElmConfig.__dataclass_fields__.items():
            if getattr(cfg, key, None) is None:
                setattr(cfg, key, default.default)

    return arch


for _preset in PRESETS.values():
    if _preset.layout == "llama":
        register_model_architecture(MODEL_NAME, _preset.arch)(_preset_arch(_preset))


def llama_config_for_preset(preset_name: str, **overrides) -> LlamaElmConfig:
    """The LlamaElmConfig of a llama-layout launcher preset (``llama-tiny``, ...)."""
    cfg = LlamaElmConfig(**_preset_values(PRESETS[preset_name]))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg
