"""ELM: the expert language model of a BTM forest, a GPT-2-layout decoder registered in fairseq.

Layout is exactly GPT-2's so that a Hugging Face export is a rename (plus the usual transpose of
GPT-2's Conv1D weights): learned absolute positions starting at 0, pre-LayerNorm blocks with a
fused q/k/v projection, GELU (tanh approximation), biases everywhere, a final LayerNorm and an
output projection tied to the input embedding. Parameter names map one to one:

    decoder.embed_tokens      -> transformer.wte        decoder.layers.{i}.ln_1  -> h.{i}.ln_1
    decoder.embed_positions   -> transformer.wpe        decoder.layers.{i}.attn.c_attn / c_proj
    decoder.ln_f              -> transformer.ln_f       decoder.layers.{i}.ln_2, mlp.c_fc / c_proj

Attention is ``F.scaled_dot_product_attention(is_causal=True)`` (flash / memory-efficient
kernels on GPU). The model has no incremental (key/value cache) decoding: btm scores text, it
does not generate it.

Loss without full logits: ``ElmModel.lm_loss(tokens, targets)`` never materializes the
``[batch, seq, vocab]`` fp32 logits. ``ChunkedTiedCrossEntropy`` walks over ``loss_chunk_tokens``
positions at a time, computes that chunk's logits against the tied embedding, its
log-sum-exp and, when gradients are needed, the chunk's gradients with respect to the hidden
states and the embedding right away (softmax minus one-hot), so peak extra memory is one chunk
of logits instead of the whole batch's. The standard fairseq path (``forward`` -> logits ->
``get_normalized_probs``) is kept for fairseq-eval-lm and fairseq's criterions.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.models import (
    FairseqDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)

from fairseq_ext.streams import IGNORED_TARGET
from launcher.contract.presets import PRESETS


@dataclass
class ElmConfig(FairseqDataclass):
    decoder_layers: int = field(default=2, metadata={"help": "number of transformer blocks"})
    decoder_embed_dim: int = field(default=64, metadata={"help": "model (embedding) dimension"})
    decoder_attention_heads: int = field(default=2, metadata={"help": "attention heads"})
    decoder_ffn_embed_dim: int = field(default=256, metadata={"help": "MLP hidden dimension"})
    max_target_positions: int = field(
        default=128, metadata={"help": "number of learned positions (= tokens_per_sample)"})
    dropout: float = field(default=0.0, metadata={"help": "embedding/residual dropout"})
    attention_dropout: float = field(default=0.0, metadata={"help": "attention-prob dropout"})
    loss_chunk_tokens: int = field(
        default=4096, metadata={"help": "positions per chunk in the chunked cross-entropy"})
    checkpoint_activations: bool = field(
        default=False, metadata={"help": "recompute block activations in backward (saves memory)"})


class ElmAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, dim = x.shape
        q, k, v = self.c_attn(x).split(dim, dim=-1)
        shape = (bsz, seq, self.heads, dim // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(bsz, seq, dim))


class ElmMLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, ffn_dim)
        self.c_proj = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class ElmBlock(nn.Module):
    def __init__(self, cfg: ElmConfig):
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.ln_1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = ElmAttention(dim, cfg.decoder_attention_heads, cfg.attention_dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = ElmMLP(dim, cfg.decoder_ffn_embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class ChunkedTiedCrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy of ``hidden @ weight.T``, computed ``chunk`` rows at a time.

    Forward also computes the gradients (the loss is the last op of the graph, so its
    gradient is known up to the scalar ``grad_output``); backward only scales them. Rows whose
    target equals ``ignore_index`` contribute nothing.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, ignore_index: int,
                compute_dtype: torch.dtype):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = None  # fp32; the first chunk's product, then the sum (no zeros to add to)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if (needs_grad and bias is not None) else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(compute_dtype)
            t = targets[start:start + chunk]
            logits = (h @ w.t()).float()
            if bias is not None:
                logits = logits + bias.float()
            keep = t != ignore_index
            safe_t = torch.where(keep, t, torch.zeros_like(t))
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t.unsqueeze(1)).squeeze(1)
            total = total + ((lse - picked) * keep).sum()
            if needs_grad:
                # d(loss)/d(logits) = softmax - onehot, zero on ignored rows. In place over the
                # chunk's logits (no longer needed): the same values as out-of-place ops, without
                # three chunk-sized temporaries, which cost more than the arithmetic at small
                # vocabularies on a CPU.
                g = logits.sub_(lse.unsqueeze(1)).exp_()
                g.scatter_add_(1, safe_t.unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
                g.mul_(keep.unsqueeze(1))
                if grad_bias is not None:
                    grad_bias += g.sum(0)
                g = g.to(compute_dtype)
                grad_hidden[start:start + chunk] = (g @ w).to(hidden.dtype)
                chunk_grad_weight = (g.t() @ h).float()
                grad_weight = chunk_grad_weight if grad_weight is None else grad_weight.add_(chunk_grad_weight)
        if needs_grad:
            if grad_weight is None:  # no rows at all
                grad_weight = torch.zeros_like(weight, dtype=torch.float32)
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype),
                                  grad_bias.to(bias.dtype) if grad_bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_output.to(grad_hidden.dtype),
                grad_weight * grad_output.to(grad_weight.dtype),
                None if grad_bias is None else grad_bias * grad_output.to(grad_bias.dtype),
                None, None, None, None)


def chunked_tied_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               *, chunk: int = 4096, ignore_index: int = -100) -> torch.Tensor:
    """Sum over positions of -log softmax(hidden @ weight.T)[target] (ignored targets skipped).

    ``hidden``: [..., dim]; ``targets``: [...]. Under autocast the matmuls run in the autocast
    dtype and the log-sum-exp in fp32, like ``F.cross_entropy`` on autocast logits.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    with torch.autocast(device_type, enabled=False):
        return ChunkedTiedCrossEntropy.apply(hidden, weight, None, targets, int(chunk),
                                             int(ignore_index), compute_dtype)


class ElmDecoder(FairseqDecoder):
    def __init__(self, cfg: ElmConfig, dictionary):
        super().__init__(dictionary)
        self.cfg = cfg
        dim = cfg.decoder_embed_dim
        self.padding_idx = dictionary.pad()
        self.embed_tokens = nn.Embedding(len(dictionary), dim)
        self.embed_positions = nn.Embedding(cfg.max_target_positions, dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(ElmBlock(cfg) for _ in range(cfg.decoder_layers))
        self.ln_f = nn.LayerNorm(dim, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialization: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in self.layers:
            for proj in (layer.attn.c_proj, layer.mlp.c_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(self.layers)))

    def extract_features(self, prev_output_tokens, **unused):
        seq = prev_output_tokens.shape[1]
        if seq > self.cfg.max_target_positions:
            raise ValueError(f"sequence of {seq} tokens is longer than the model's "
                             f"{self.cfg.max_target_positions} positions")
        pos = torch.arange(seq, device=prev_output_tokens.device)
        x = self.dropout(self.embed_tokens(prev_output_tokens) + self.embed_positions(pos))
        inner_states = []
        for layer in self.layers:
            if self.cfg.checkpoint_activations and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        x = self.ln_f(x)
        return x, {"attn": [None], "inner_states": inner_states}

    def output_layer(self, features, **unused):
        return F.linear(features, self.output_weight())

    def output_weight(self) -> torch.Tensor:
        """The output projection: the input embedding (tied, as in GPT-2)."""
        return self.embed_tokens.weight

    def forward(self, prev_output_tokens, src_lengths=None, features_only=False, **kwargs):
        x, extra = self.extract_features(prev_output_tokens)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def max_positions(self):
        return self.cfg.max_target_positions


class ChunkedLossLM(FairseqLanguageModel):
    """A decoder-only LM of one of btm's layouts: built from its config dataclass, and trained
    with a loss that never holds the full fp32 logits (``chunked_tied_cross_entropy`` against
    the decoder's ``output_weight()``). Subclasses name ``config_class`` and ``decoder_class``."""

    config_class: type
    decoder_class: type

    @classmethod
    def build_model(cls, cfg, task):
        if not isinstance(cfg, cls.config_class):
            cfg = cls.config_class(**{k: getattr(cfg, k) for k in cls.config_class.__dataclass_fields__
                                      if hasattr(cfg, k) and getattr(cfg, k) is not None})
        return cls(cls.decoder_class(cfg, task.target_dictionary))

    def lm_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy (nats) over the targets that are not
        ``IGNORED_TARGET`` (padding), without full logits."""
        hidden, _ = self.decoder.extract_features(tokens)
        return chunked_tied_cross_entropy(hidden, self.decoder.output_weight(), targets,
                                          chunk=self.decoder.cfg.loss_chunk_tokens,
                                          ignore_index=IGNORED_TARGET)

    def max_positions(self):
        return self.decoder.max_positions()


@register_model("elm", dataclass=ElmConfig)
class ElmModel(ChunkedLossLM):
    """GPT-2-layout decoder-only LM (see the module docstring)."""

    config_class = ElmConfig
    decoder_class = ElmDecoder


def _preset_arch(preset_name: str):
    preset = PRESETS[preset_name]

    def arch(cfg):
        # Keep values that are already set (from a checkpoint's cfg or the command line).
        for key, value in (("decoder_layers", preset.layers),
                           ("decoder_embed_dim", preset.embed_dim),
                           ("decoder_attention_heads", preset.heads),
                           ("decoder_ffn_embed_dim", preset.ffn_dim),
                           ("max_target_positions", preset.tokens_per_sample),
                           ("dropout", preset.dropout),
                           ("attention_dropout", preset.dropout)):
            if getattr(cfg, key, None) is None:
                setattr(cfg, key, value)
        for key, default in ElmConfig.__dataclass_fields__.items():
            if getattr(cfg, key, None) is None:
                setattr(cfg, key, default.default)

    return arch


for _name, _preset in PRESETS.items():
    if _preset.layout == "gpt2":
        register_model_architecture("elm", _preset.arch)(_preset_arch(_name))


def elm_config_for_preset(preset_name: str, **overrides):
    """The ElmConfig of a GPT-2-layout preset (``tiny``, ``125m``, ...); for any layout use
    ``fairseq_ext.models.preset_config.model_config_for_preset``."""
    p = PRESETS[preset_name]
    if p.layout != "gpt2":
        raise ValueError(f"preset {preset_name!r} has the {p.layout} layout, not the GPT-2 ELM's")
    cfg = ElmConfig(decoder_layers=p.layers, decoder_embed_dim=p.embed_dim,
                    decoder_attention_heads=p.heads, decoder_ffn_embed_dim=p.ffn_dim,
                    max_target_positions=p.tokens_per_sample, dropout=p.dropout,
                    attention_dropout=p.dropout)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg
