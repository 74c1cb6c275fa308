"""A Llama-layout MoE (``elm_llama_moe``) as Hugging Face ``MixtralForCausalLM``.

Mixtral is exactly the Llama layout with each layer's SwiGLU replaced by a top-k routed set of
SwiGLU experts: router ``gate`` (no bias), softmax over all experts, top-k, renormalized over
the chosen k -- the same weights as btm's softmax over the k chosen logits (moe/layer.py).
Tensor names (transformers >= 5 stores the experts fused)::

    decoder.layers.{i}.mlp.router.weight                 -> model.layers.{i}.mlp.gate.weight
    decoder.layers.{i}.mlp.experts.{j}.gate_proj / up_proj -> model.layers.{i}.mlp.experts.gate_up_proj[j]
                                                           (gate rows first, then up)
    decoder.layers.{i}.mlp.experts.{j}.down_proj          -> model.layers.{i}.mlp.experts.down_proj[j]

Everything else is the dense Llama export's rename (fairseq_ext/export_llama.py).

A GPT-2-layout MoE (``elm_moe``) has no such class: see ``GPT2_MOE_UNSUPPORTED``.
"""
from __future__ import annotations

import re

from launcher.contract.errors import BtmError

# Why a GPT-2-layout MoE is not exported (docs/export.md says the same).
GPT2_MOE_UNSUPPORTED = (
    "no transformers class represents a GPT-2-layout MoE exactly: the MoE classes shipped in "
    "transformers (Mixtral, Qwen2-MoE, OLMoE, DBRX, ...) all have RMSNorm, rotary positions and "
    "gated SiLU experts without biases, while the GPT-2 layout has LayerNorm, learned absolute "
    "positions and GELU FFNs with biases, and GPT2LMHeadModel has no experts. Use the MoE "
    "checkpoint with btm itself (btm eval, the lm-eval `btm` model with checkpoint=...), or "
    "build the forest with a Llama-layout preset (llama-tiny, smollm2-*, ...) to export it as "
    "MixtralForCausalLM")
_MOE_KEY = re.compile(r"decoder\.layers\.(\d+)\.mlp\.(router\.weight|experts\.(\d+)\.(\w+)\.weight)")


def mixtral_config(model_cfg: dict, vocab_size: int) -> dict:
    """The ``MixtralConfig`` (as a dict) of an ``elm_llama_moe`` model cfg."""
    from fairseq_ext.export_llama import llama_config

    config = llama_config(model_cfg, vocab_size)
    for llama_only in ("mlp_bias", "pretraining_tp", "attention_bias"):
        config.pop(llama_only, None)
    config.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                   "num_local_experts": int(model_cfg["moe_experts"]),
                   "num_experts_per_tok": int(model_cfg["moe_top_k"]),
                   "router_aux_loss_coef": float(model_cfg["moe_aux_loss_coef"]),
                   "router_jitter_noise": 0.0, "output_router_logits": False,
                   "sliding_window": None})
    return config


def elm_moe_to_mixtral(state_dict: dict, n_layers: int, n_experts: int, tied: bool) -> dict:
    """Mixtral tensors (fp32, contiguous) from an ``elm_llama_moe`` state dict."""
    import torch

    from fairseq_ext.export_llama import elm_to_llama

    dense, parts = {}, {}
    for key, tensor in state_dict.items():
        m = _MOE_KEY.fullmatch(key)
        if m is None:
            dense[key] = tensor
        elif m.group(3) is None:
            parts[(int(m.group(1)), "gate")] = tensor
        else:
            parts[(int(m.group(1)), int(m.group(3)), m.group(4))] = tensor
    # The dense rename checks every non-FFN tensor; it expects the dense FFN names, so stand in
    # expert 0's (dropped right after) for them.
    stand_in = {f"decoder.layers.{i}.mlp.{p}.weight": parts.get((i, 0, p), torch.zeros(0))
                for i in range(n_layers) for p in ("gate_proj", "up_proj", "down_proj")}
    out = {k: v for k, v in elm_to_llama({**dense, **stand_in}, n_layers, tied).items()
           if ".mlp." not in k}
    for i in range(n_layers):
        try:
            experts = [(parts[(i, j, "gate_proj")], parts[(i, j, "up_proj")], parts[(i, j, "down_proj")])
                       for j in range(n_experts)]
            gate = parts[(i, "gate")]
        except KeyError as e:
            raise BtmError(f"MoE checkpoint lacks layer {i}'s expert or router tensor {e.args[0]}") from None
        prefix = f"model.layers.{i}.mlp"
        out[f"{prefix}.gate.weight"] = gate.float().contiguous().clone()
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([g, u], dim=0) for g, u, _ in experts]).float().contiguous()
        out[f"{prefix}.experts.down_proj"] = torch.stack([d for _, _, d in experts]).float().contiguous()
    return out
