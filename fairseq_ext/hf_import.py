"""A local Hugging Face ``transformers`` model directory as an ELM checkpoint, converted exactly.

``import_hf(MODEL_DIR, OUT.pt, preset=..., data_dir=...)`` reads ``config.json`` and the weights
of a GPT-2-family (``model_type: gpt2``) or Llama-family (``model_type: llama``) causal LM and
writes a btm checkpoint of the preset's layout (``fairseq_ext.checkpoint.save_checkpoint``:
atomic, sha256 sidecar, loadable with ``weights_only``) that scores every token exactly as the
HF model does, with the same token ids. Nothing is downloaded: MODEL_DIR is a directory on disk.

What is read:
- weights from ``model.safetensors``, or the shards named by ``model.safetensors.index.json``;
  a pickle-only ``pytorch_model.bin`` (or its index) only with ``trust_pickle`` (pickle can run
  code);
- the shape from ``config.json``. Every shape setting must equal the preset's (layers, dim,
  heads, kv heads, MLP size, tied output embedding) and the model must have at least the
  preset's ``tokens_per_sample`` positions; the embedding must have exactly as many rows as
  ``DATA_DIR/dict.txt`` has symbols (the fairseq dictionary in the model's id order). Numeric
  settings (``rope_theta``, ``rms_norm_eps``, Llama 3's rope scaling) are taken from the model.

The mappings are the exports' own, inverted: ``fairseq_ext.export_hf`` (GPT-2: renames and the
Conv1D transposes) and ``fairseq_ext.export_llama`` (Llama: ``model.`` -> ``decoder.``).
Importing to an OUT that already holds an import of the same files (sha256 of config and
weights) returns its record; any other existing OUT is refused, never overwritten.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from launcher.contract.atomic import sha256_file
from launcher.contract.errors import BtmError
from launcher.contract.hf_model import SUPPORTED_MODEL_TYPES, check_hf_shape, read_hf_config
from launcher.contract.presets import get_preset

__all__ = ["SUPPORTED_MODEL_TYPES", "import_hf", "read_hf_config"]

# Buffers some HF checkpoints carry that are not parameters (recomputed by the model).
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def weight_files(model_dir: Path, trust_pickle: bool = False) -> tuple[list[Path], bool]:
    """(weight files, whether they are pickles) of a model directory, every shard checked."""
    for name, pickled in (("model.safetensors", False), ("pytorch_model.bin", True)):
        single, index = model_dir / name, model_dir / f"{name}.index.json"
        if not (single.is_file() or index.is_file()):
            continue
        if pickled and not trust_pickle:
            raise BtmError(f"{model_dir} has only pickle weights ({name}); pickle can run "
                           f"arbitrary code, so btm refuses {single if single.is_file() else index}. "
                           "Convert the model to safetensors, or, if you trust this file, set "
                           "model.trust_checkpoint: true in the run config (trust_pickle=True "
                           "for import_hf)")
        if single.is_file():
            return [single], pickled
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BtmError(f"cannot read the shard index {index}: {e!r}") from None
        shards = [model_dir / s for s in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise BtmError(f"{index} names shard {shard.name}, which is missing from {model_dir}")
        return shards, pickled
    raise BtmError(f"{model_dir} has no model.safetensors nor model.safetensors.index.json "
                   "(nor pytorch_model.bin): no weights to import")


def load_tensors(files: list[Path], pickled: bool) -> dict:
    """Every tensor of the weight files (fp32), a name in two files being an error."""
    import torch

    tensors = {}
    for path in files:
        if pickled:
            part = torch.load(path, map_location="cpu", weights_only=False)
        else:
            from safetensors.torch import load_file

            part = load_file(str(path))
        for name, tensor in part.items():
            if name in tensors:
                raise BtmError(f"tensor {name!r} appears in two weight files (second: {path})")
            tensors[name] = tensor.to(torch.float32)
    return tensors


def _drop_buffers(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if not k.endswith(_BUFFER_SUFFIXES)}


def gpt2_to_elm(config: dict, tensors: dict, preset, model_dir: Path):
    """(ElmConfig, ELM state dict) of a ``GPT2LMHeadModel``'s config and tensors."""
    from fairseq_ext.export_hf import _BLOCK_RENAMES, _TOP_RENAMES  # the export's mapping
    from fairseq_ext.models.preset_config import model_config_for_preset

    for key, want in (("activation_function", ("gelu_new", "gelu_pytorch_tanh")),
                      ("layer_norm_epsilon", (1e-5,)), ("scale_attn_weights", (True,)),
                      ("scale_attn_by_inverse_layer_idx", (False,))):
        if config.get(key, want[0]) not in want:
            raise BtmError(f"{model_dir}/config.json: {key} is {config[key]!r}; the GPT-2 ELM "
                           f"needs {' or '.join(map(repr, want))}")
    positions = preset.tokens_per_sample
    to_elm = {v: k for k, v in _TOP_RENAMES.items()}
    to_elm.update({f"transformer.h.{i}.{hf}": (f"decoder.layers.{i}.{elm}", t)
                   for i in range(preset.layers) for elm, (hf, t) in _BLOCK_RENAMES.items()})
    state, head = {}, None
    for name, tensor in _drop_buffers(tensors).items():
        if name == "lm_head.weight":
            head = tensor
            continue
        full = name if name.startswith("transformer.") else f"transformer.{name}"
        target = to_elm.get(full)
        if target is None:
            raise BtmError(f"{model_dir}: tensor {name!r} has no GPT-2 ELM counterpart")
        elm_name, transpose = target if isinstance(target, tuple) else (target, False)
        state[elm_name] = (tensor.t() if transpose else tensor).contiguous()
    if "decoder.embed_positions.weight" in state:
        state["decoder.embed_positions.weight"] = state["decoder.embed_positions.weight"][:positions].clone()
    if head is not None and not _same(head, state.get("decoder.embed_tokens.weight")):
        raise BtmError(f"{model_dir}: lm_head.weight differs from the input embedding; the "
                       "GPT-2 ELM ties them")
    return model_config_for_preset(preset.name), state


def llama_to_elm(config: dict, tensors: dict, preset, model_dir: Path):
    """(LlamaElmConfig, ELM state dict) of a ``LlamaForCausalLM``'s config and tensors."""
    from fairseq_ext.export_llama import llama_tensor_names, llama_to_elm_name
    from fairseq_ext.models.llama import (LLAMA3_ROPE_FIELDS, LLAMA3_ROPE_HF_KEYS, LlamaElmConfig,
                                          llama_config_for_preset)

    heads, dim = config.get("num_attention_heads"), config.get("hidden_size")
    tied = bool(config.get("tie_word_embeddings", True))
    # transformers 5 writes rope_parameters, 4.x rope_theta and rope_scaling ({"type"} or {"rope_type"}).
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    settings = {"hidden_act": config.get("hidden_act"), "attention_bias": config.get("attention_bias"),
                "mlp_bias": config.get("mlp_bias"), "head_dim": config.get("head_dim"),
                "rope_type": rope.get("rope_type", rope.get("type"))}
    supported = {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,),
                 "head_dim": (dim // heads,), "rope_type": ("default", "llama3")}
    for key, wanted in supported.items():
        value = settings[key]
        if value not in (*wanted, None):
            raise BtmError(f"{model_dir}/config.json: {key} is {value!r}; the llama-layout ELM "
                           f"supports only {' or '.join(map(repr, wanted))}")
    tensors = _drop_buffers(tensors)
    if tied and "lm_head.weight" in tensors:  # some saves store the tied head too
        if not _same(tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight")):
            raise BtmError(f"{model_dir}: tie_word_embeddings is true but lm_head.weight "
                           "differs from model.embed_tokens.weight")
    expected = set(llama_tensor_names(preset.layers, tied))
    unknown, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unknown or missing:
        raise BtmError(f"{model_dir}: tensors do not match a {preset.layers}-layer "
                       f"LlamaForCausalLM: unexpected {unknown[:3]}, missing {missing[:3]}")
    numbers = {"rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
               "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)), "rope_llama3_factor": 0.0}
    if settings["rope_type"] == "llama3":
        numbers.update({field: type(getattr(LlamaElmConfig, field))(rope[key])
                        for field, key in zip(LLAMA3_ROPE_FIELDS, LLAMA3_ROPE_HF_KEYS)})
    cfg = llama_config_for_preset(preset.name, **numbers)
    return cfg, {llama_to_elm_name(k): v.contiguous() for k, v in tensors.items()}


def _same(a, b) -> bool:
    import torch

    return b is not None and a.shape == b.shape and bool(torch.equal(a, b))


def _source_digest(model_dir: Path, files: list[Path]) -> str:
    from launcher.contract.atomic import sha256_bytes

    parts = [f"{p.name} {sha256_file(p)}" for p in [model_dir / "config.json", *files]]
    return sha256_bytes("\n".join(parts).encode())


def _existing_import(out: Path, digest: str) -> dict | None:
    """The record of an import of the same source already at ``out``; refuses anything else."""
    if not out.exists():
        return None
    from fairseq_ext.checkpoint import btm_state, load_checkpoint

    record = btm_state(load_checkpoint(out)).get("hf_import") or {}
    if record.get("source_sha256") != digest:
        raise BtmError(f"{out} exists and is not an import of these model files; choose a new "
                       "output path (btm never overwrites a checkpoint it did not write for this)")
    return record


def import_hf(model_dir: str | os.PathLike, out: str | os.PathLike, *, preset: str,
              data_dir: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """Convert the transformers model in ``model_dir`` into the ELM checkpoint ``out``.

    ``preset``: the btm preset whose layout and shape the model has; ``data_dir``: the prepared
    data whose ``dict.txt`` is the model's vocabulary in its id order. Returns the import record
    (also stored in the checkpoint as ``extra_state.btm.hf_import``).
    """
    from fairseq_ext import checkpoint as ck
    from fairseq_ext.encoders import load_dictionary
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig

    model_dir, out, data_dir = Path(model_dir), Path(out), Path(data_dir)
    if not model_dir.is_dir():
        raise BtmError(f"model directory not found: {model_dir}")
    p = get_preset(preset)
    config = read_hf_config(model_dir)
    check_hf_shape(config, p, model_dir)
    layout = SUPPORTED_MODEL_TYPES[config["model_type"]]
    files, pickled = weight_files(model_dir, trust_pickle)
    digest = _source_digest(model_dir, files)
    done = _existing_import(out, digest)
    if done is not None:
        return done
    dict_path = data_dir / "dict.txt"
    if not dict_path.is_file():
        raise BtmError(f"no dict.txt in {data_dir} (the vocabulary to import the model with)")
    dictionary = load_dictionary(data_dir)
    convert = gpt2_to_elm if layout == "gpt2" else llama_to_elm
    model_cfg, state = convert(config, load_tensors(files, pickled), p, model_dir)
    rows = state.get("decoder.embed_tokens.weight")
    if rows is not None and rows.shape[0] != len(dictionary):
        raise BtmError(f"{dict_path} has {len(dictionary)} symbols but the model's embedding "
                       f"({model_dir}) has {rows.shape[0]} rows; the dictionary must list the "
                       "model's whole vocabulary in its id order")
    model_cfg._name = p.arch
    cfg = ck.make_cfg(model_cfg, MultidomainLMConfig(data=str(data_dir),
                                                     tokens_per_sample=p.tokens_per_sample))
    model = ck.build_model_from_cfg(cfg["model"], dictionary)
    try:  # the exact set of parameters with the exact shapes, or nothing is written
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BtmError(f"{model_dir}: weights do not fit preset {p.name!r}: {e}") from None
    record = {"source": str(model_dir.resolve()), "model_type": config["model_type"],
              "source_sha256": digest, "files": [f.name for f in files], "preset": p.name}
    ck.save_checkpoint(ck.make_state(model.state_dict(), cfg, dictionary,
                                     btm={"hf_import": record}), out)
    return record
