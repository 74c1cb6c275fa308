"""``btm export hf``: btm checkpoints as Hugging Face ``transformers`` directories.

A GPT-2-layout ELM becomes ``GPT2LMHeadModel`` (below); a Llama-layout ELM becomes
``LlamaForCausalLM`` (fairseq_ext/export_llama.py; ``hf_model`` picks by the checkpoint's arch).
Everything else (tokenizer, record, staging, forests) is the same for both.

The ELM (``fairseq_ext/models/elm.py``) has GPT-2's layout, so an expert becomes a
``GPT2LMHeadModel`` by renaming its parameters and transposing the four linear weights per
block (GPT-2 stores them as ``Conv1D``: ``[in, out]`` instead of ``nn.Linear``'s ``[out, in]``).
Positions are learned from 0 in both, the output projection is the tied input embedding
(``tie_word_embeddings``; only ``transformer.wte.weight`` is stored), GELU is the tanh
approximation (``"gelu_new"``), LayerNorm eps is 1e-5 and the vocabulary is the whole fairseq
dictionary (specials ``<s> <pad> </s> <unk>`` = ids 0-3 included). The tokenizer files come from
``fairseq_ext.hf_tokenizer`` (same ids as ``data_prep.encode_text``).

Feed ``</s>`` (id 2) in front of a document, as btm's scorer and trainer do; the exported
config and tokenizer say so (``bos_token_id = eos_token_id = 2``). Data prepared with a
transformers tokenizer (``corpus.tokenizer: hf:PATH``) exports that tokenizer and its ids
instead (``fairseq_ext.encoders``: the model's own bos/eos/pad).

What a SOURCE can be:
- one checkpoint file (an expert, the seed, a dense model, or a parameter average: all have the
  same format) -> ``OUT_DIR`` is one transformers directory;
- a forest: a run directory (or its ``forest.json``), or a directory of ``*.pt`` experts ->
  ``OUT_DIR/<expert>/`` per expert, ``OUT_DIR/forest.json`` (the manifest, when there is one),
  ``OUT_DIR/priors/`` (the run's cached priors, copied) and ``OUT_DIR/btm_export.json``
  (which sub-directory holds which expert).

Every directory is built under a temporary name and renamed into place when complete; an
existing output made from the same checkpoint (sha256 in ``btm_export.json``) is kept, so a
re-run resumes. ``model.safetensors`` is deterministic: the same checkpoint gives the same bytes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from launcher.contract.atomic import atomic_write_bytes, atomic_write_json, sha256_file
from launcher.contract.errors import BtmError
from launcher.contract.forest import FOREST_FILE, expert_checkpoints, manifest_path

from fairseq_ext.encoders import HF_TOKENIZER, data_encoder, export_special_ids, save_pretrained_hf_tokenizer

EXPORT_FORMAT = 1
EXPORT_RECORD = "btm_export.json"
EOS_ID, PAD_ID = 2, 1

# ELM parameter name -> (GPT-2 name, transpose?)
_BLOCK_RENAMES = {
    "ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
    "attn.c_attn.weight": ("attn.c_attn.weight", True), "attn.c_attn.bias": ("attn.c_attn.bias", False),
    "attn.c_proj.weight": ("attn.c_proj.weight", True), "attn.c_proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
    "mlp.c_fc.weight": ("mlp.c_fc.weight", True), "mlp.c_fc.bias": ("mlp.c_fc.bias", False),
    "mlp.c_proj.weight": ("mlp.c_proj.weight", True), "mlp.c_proj.bias": ("mlp.c_proj.bias", False),
}
_TOP_RENAMES = {
    "decoder.embed_tokens.weight": "transformer.wte.weight",
    "decoder.embed_positions.weight": "transformer.wpe.weight",
    "decoder.ln_f.weight": "transformer.ln_f.weight",
    "decoder.ln_f.bias": "transformer.ln_f.bias",
}
_BLOCK_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


# ----------------------------------------------------------------------------- one model

def gpt2_config(model_cfg: dict, vocab_size: int) -> dict:
    """The ``GPT2Config`` (as a dict) of an ELM model cfg (the checkpoint's ``cfg["model"]``)."""
    def get(key):
        if model_cfg.get(key) is None:
            raise BtmError(f"checkpoint model cfg has no {key!r}; is this an ELM checkpoint?")
        return model_cfg[key]

    dropout = float(model_cfg.get("dropout") or 0.0)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": int(vocab_size), "n_positions": int(get("max_target_positions")),
        "n_embd": int(get("decoder_embed_dim")), "n_layer": int(get("decoder_layers")),
        "n_head": int(get("decoder_attention_heads")), "n_inner": int(get("decoder_ffn_embed_dim")),
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": dropout, "embd_pdrop": dropout,
        "attn_pdrop": float(model_cfg.get("attention_dropout") or 0.0),
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    }


def elm_to_gpt2(state_dict: dict, n_layers: int) -> dict:
    """GPT-2 tensors (fp32, contiguous) from an ELM state dict; refuses unknown or missing keys."""
    import torch

    out = {}
    for key, tensor in state_dict.items():
        if key in _TOP_RENAMES:
            name, transpose = _TOP_RENAMES[key], False
        else:
            m = _BLOCK_KEY.fullmatch(key)
            if not m or m.group(2) not in _BLOCK_RENAMES or int(m.group(1)) >= n_layers:
                raise BtmError(f"checkpoint parameter {key!r} has no GPT-2 counterpart; "
                               "only ELM checkpoints can be exported")
            sub, transpose = _BLOCK_RENAMES[m.group(2)]
            name = f"transformer.h.{int(m.group(1))}.{sub}"
        t = tensor.detach().to(torch.float32)
        out[name] = (t.t() if transpose else t).contiguous().clone()
    expected = set(_TOP_RENAMES.values()) | {f"transformer.h.{i}.{sub}" for i in range(n_layers)
                                             for sub, _ in _BLOCK_RENAMES.values()}
    missing = sorted(expected - set(out))
    if missing:
        raise BtmError(f"checkpoint lacks {len(missing)} ELM parameters, e.g. {missing[0]}")
    return out


def hf_model(model_cfg: dict, state_dict: dict, vocab_size: int):
    """(HF config dict, HF tensors, embedding tensor name, model dim, max positions) of an ELM
    checkpoint, by its layout: GPT-2 here, Llama in fairseq_ext/export_llama.py, a Llama-layout
    MoE as Mixtral in fairseq_ext/moe/export_mixtral.py."""
    from fairseq_ext.moe.model import moe_layout
    from launcher.contract.presets import layout_of_arch

    moe = moe_layout(model_cfg.get("_name"))
    if moe == "llama":
        from fairseq_ext.moe.export_mixtral import elm_moe_to_mixtral, mixtral_config

        config = mixtral_config(model_cfg, vocab_size)
        tensors = elm_moe_to_mixtral(state_dict, config["num_hidden_layers"],
                                     config["num_local_experts"], config["tie_word_embeddings"])
        return (config, tensors, "model.embed_tokens.weight", config["hidden_size"],
                config["max_position_embeddings"])
    if moe == "gpt2":
        from fairseq_ext.moe.export_mixtral import GPT2_MOE_UNSUPPORTED

        raise BtmError(f"cannot export a GPT-2-layout MoE: {GPT2_MOE_UNSUPPORTED}")
    if layout_of_arch(model_cfg.get("_name")) == "llama":
        from fairseq_ext.export_llama import elm_to_llama, llama_config

        config = llama_config(model_cfg, vocab_size)
        tensors = elm_to_llama(state_dict, config["num_hidden_layers"], config["tie_word_embeddings"])
        return (config, tensors, "model.embed_tokens.weight", config["hidden_size"],
                config["max_position_embeddings"])
    config = gpt2_config(model_cfg, vocab_size)
    tensors = elm_to_gpt2(state_dict, config["n_layer"])
    return config, tensors, "transformer.wte.weight", config["n_embd"], config["n_positions"]


def checkpoint_data_dir(state: dict, checkpoint: Path, data_dir: str | os.PathLike | None) -> Path:
    """Where the tokenizer (spm.model or an hf tokenizer.json) and dict.txt are: ``data_dir``
    or the checkpoint's ``cfg.task.data``."""
    if data_dir is None:
        data = ((state.get("cfg") or {}).get("task") or {}).get("data")
        if not data:
            raise BtmError(f"checkpoint {checkpoint} names no data dir (cfg.task.data); pass --data-dir")
        data_dir = str(data).split(os.pathsep)[0]
    data_dir = Path(data_dir)
    if not (data_dir / "spm.model").is_file() and not (data_dir / HF_TOKENIZER).is_file():
        raise BtmError(f"no spm.model nor {HF_TOKENIZER} in {data_dir} (the tokenizer of checkpoint {checkpoint}); "
                       "pass --data-dir DATA_DIR of 'btm data prepare'")
    return data_dir


def export_model(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                 data_dir: str | os.PathLike | None = None, trust_pickle: bool = False) -> dict:
    """Export one checkpoint to ``out_dir`` (a transformers directory); returns its record.

    Skips the work when ``out_dir`` already holds an export of the same checkpoint bytes.
    """
    from fairseq_ext.checkpoint import checkpoint_dictionary, load_checkpoint, verify_checkpoint

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    sha = verify_checkpoint(checkpoint)
    done = _read_record(out_dir)
    if done and done.get("checkpoint_sha256") == sha and done.get("format") == EXPORT_FORMAT:
        return done
    if out_dir.exists() and (not done or "experts" in done):
        raise BtmError(f"{out_dir} exists and is not a btm export of one model; choose a new OUT_DIR")
    state = load_checkpoint(checkpoint, trust_pickle=trust_pickle, verify=False)
    model_cfg = (state.get("cfg") or {}).get("model")
    if not model_cfg:
        raise BtmError(f"checkpoint {checkpoint} has no model cfg (key 'cfg.model')")
    dictionary = checkpoint_dictionary(state, checkpoint)
    data = checkpoint_data_dir(state, checkpoint, data_dir)
    config, tensors, embed_name, dim, positions = hf_model(model_cfg, state["model"], len(dictionary))
    encoder = data_encoder(data)
    special = export_special_ids(encoder)
    config.update(special)
    if tuple(tensors[embed_name].shape) != (len(dictionary), dim):
        raise BtmError(f"checkpoint {checkpoint}: embedding shape "
                       f"{tuple(tensors[embed_name].shape)} does not match its "
                       f"dictionary ({len(dictionary)} symbols) and cfg (dim {dim})")
    record = {"format": EXPORT_FORMAT, "checkpoint": str(checkpoint), "checkpoint_sha256": sha,
              "data_dir": str(data), "tokenizer": encoder.kind,
              f"{'hf_tokenizer' if encoder.kind == 'hf' else 'spm_model'}_sha256": sha256_file(encoder.tokenizer_file),
              "vocab_size": len(dictionary),
              "input_convention": f"id {special['bos_token_id']} before each document"}
    with _staging_dir(out_dir) as stage:
        _write_safetensors(tensors, stage / "model.safetensors")
        (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (stage / "generation_config.json").write_text(json.dumps(special, indent=2) + "\n")
        if encoder.kind == "hf":
            save_pretrained_hf_tokenizer(data, stage, model_max_length=positions)
        else:
            from fairseq_ext.hf_tokenizer import save_pretrained_tokenizer

            save_pretrained_tokenizer(data / "spm.model", list(dictionary.symbols), stage,
                                      model_max_length=positions)
        record["model_safetensors_sha256"] = sha256_file(stage / "model.safetensors")
        (stage / EXPORT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _write_safetensors(tensors: dict, path: Path) -> None:
    """Deterministic bytes: sorted names, one fixed metadata entry (transformers wants 'pt')."""
    from safetensors.torch import save_file

    save_file({k: tensors[k] for k in sorted(tensors)}, str(path), metadata={"format": "pt"})


class _staging_dir:
    """Build a directory under a temporary sibling name; rename it to ``final`` on success."""

    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".tmp",
                                         dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():  # an older export of another checkpoint: replace it
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        return False


def _read_record(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / EXPORT_RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BtmError(f"cannot read {out_dir / EXPORT_RECORD}: {e}") from None


def export_forest(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                  data_dir: str | os.PathLike | None = None, trust_pickle: bool = False) -> dict:
    """One transformers directory per expert under ``out_dir``, plus manifest and priors."""
    source, out_dir = Path(source), Path(out_dir)
    experts = expert_checkpoints(source)  # a manifest's checkpoints are sha256-checked
    manifest = manifest_path(source)
    manifest = manifest if manifest.is_file() else None
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {"format": EXPORT_FORMAT, "source": str(source), "experts": {}}
    for name, ckpt in experts.items():
        rec = export_model(ckpt, out_dir / name, data_dir=data_dir, trust_pickle=trust_pickle)
        index["experts"][name] = {"dir": name, "checkpoint_sha256": rec["checkpoint_sha256"]}
    if manifest is not None:
        atomic_write_bytes(out_dir / FOREST_FILE, manifest.read_bytes())
        priors = sorted((manifest.parent / "priors").glob("*.json"))
        for p in priors:
            atomic_write_bytes(out_dir / "priors" / p.name, p.read_bytes())
        index["priors"] = [p.name for p in priors]
    atomic_write_json(out_dir / EXPORT_RECORD, index)
    return index


def export_hf(source: str | os.PathLike, out_dir: str | os.PathLike, *,
              data_dir: str | os.PathLike | None = None, trust_pickle: bool = False) -> dict:
    """``btm export hf SOURCE OUT_DIR``: a checkpoint file or a forest (see the module doc)."""
    source = Path(source)
    if not source.exists():
        raise BtmError(f"export source not found: {source}")
    if source.is_file() and source.name != FOREST_FILE:
        return export_model(source, out_dir, data_dir=data_dir, trust_pickle=trust_pickle)
    return export_forest(source, out_dir, data_dir=data_dir, trust_pickle=trust_pickle)
