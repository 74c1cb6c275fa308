"""Llama-layout ELM checkpoints as Hugging Face ``LlamaForCausalLM`` (config and tensors).

The Llama-layout ELM (fairseq_ext/models/llama.py) has HF Llama's parameter names under
``decoder.`` instead of ``model.``, and ``decoder.output_projection`` is ``lm_head`` (absent when
the output embedding is tied: ``tie_word_embeddings``). No transposes: both store
``nn.Linear`` weights. ``fairseq_ext.export_hf`` calls these two functions for a checkpoint whose
arch has the llama layout and writes the directory (tokenizer, record) as for GPT-2.
"""
from __future__ import annotations

import re

from launcher.contract.errors import BtmError

EOS_ID, PAD_ID = 2, 1  # the fairseq dictionary's, as in export_hf

BLOCK_PARAMS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                "mlp.down_proj.weight")
TOP_PARAMS = {"decoder.embed_tokens.weight": "model.embed_tokens.weight",
              "decoder.norm.weight": "model.norm.weight"}
HEAD = ("decoder.output_projection.weight", "lm_head.weight")
_BLOCK_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def llama_config(model_cfg: dict, vocab_size: int) -> dict:
    """The ``LlamaConfig`` (as a dict) of a Llama-layout ELM model cfg (``cfg["model"]``)."""
    def get(key):
        if model_cfg.get(key) is None:
            raise BtmError(f"checkpoint model cfg has no {key!r}; is this a llama-layout ELM?")
        return model_cfg[key]

    dim, heads = int(get("decoder_embed_dim")), int(get("decoder_attention_heads"))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(vocab_size), "hidden_size": dim, "head_dim": dim // heads,
        "intermediate_size": int(get("decoder_ffn_embed_dim")),
        "num_hidden_layers": int(get("decoder_layers")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("decoder_kv_heads")),
        "max_position_embeddings": int(get("max_target_positions")),
        "hidden_act": "silu", "rms_norm_eps": float(get("rms_norm_eps")),
        "rope_theta": float(get("rope_theta")), "rope_scaling": _rope_scaling(model_cfg),
        "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
        "attention_dropout": float(model_cfg.get("attention_dropout") or 0.0),
        "initializer_range": 0.02, "tie_word_embeddings": bool(get("tie_embeddings")),
        "use_cache": True, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    }


def _rope_scaling(model_cfg: dict) -> dict | None:
    """HF's ``rope_scaling`` of Llama 3's rescaled rotary embeddings, or None without it."""
    from fairseq_ext.models.llama import LLAMA3_ROPE_FIELDS, LLAMA3_ROPE_HF_KEYS

    if not model_cfg.get("rope_llama3_factor"):
        return None
    scaling = {"rope_type": "llama3"}
    for field, key in zip(LLAMA3_ROPE_FIELDS, LLAMA3_ROPE_HF_KEYS):
        scaling[key] = model_cfg[field]
    return scaling


def elm_to_llama(state_dict: dict, n_layers: int, tied: bool) -> dict:
    """HF Llama tensors (fp32, contiguous) from an ELM state dict; refuses unknown or missing keys."""
    import torch

    out = {}
    for key, tensor in state_dict.items():
        m = _BLOCK_KEY.fullmatch(key)
        if key in TOP_PARAMS:
            name = TOP_PARAMS[key]
        elif key == HEAD[0] and not tied:
            name = HEAD[1]
        elif m and m.group(2) in BLOCK_PARAMS and int(m.group(1)) < n_layers:
            name = f"model.layers.{int(m.group(1))}.{m.group(2)}"
        else:
            raise BtmError(f"checkpoint parameter {key!r} has no LlamaForCausalLM counterpart; "
                           "only llama-layout ELM checkpoints can be exported as Llama")
        out[name] = tensor.detach().to(torch.float32).contiguous().clone()
    missing = sorted(set(llama_tensor_names(n_layers, tied)) - set(out))
    if missing:
        raise BtmError(f"checkpoint lacks {len(missing)} llama-layout parameters, e.g. {missing[0]}")
    return out


def llama_tensor_names(n_layers: int, tied: bool) -> list[str]:
    """Every tensor name of a ``LlamaForCausalLM`` state dict as saved (``lm_head`` if untied)."""
    names = list(TOP_PARAMS.values()) + [f"model.layers.{i}.{p}" for i in range(n_layers)
                                         for p in BLOCK_PARAMS]
    return names if tied else names + [HEAD[1]]


def llama_to_elm_name(hf_name: str) -> str:
    """The ELM parameter name of a ``LlamaForCausalLM`` tensor name (the inverse rename)."""
    if hf_name == HEAD[1]:
        return HEAD[0]
    if not hf_name.startswith("model."):
        raise BtmError(f"tensor {hf_name!r} is not a LlamaForCausalLM parameter")
    return "decoder." + hf_name[len("model."):]
