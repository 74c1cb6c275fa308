"""A local Hugging Face ``transformers`` directory as the config sees it, without torch.

The config keys ``model.init: hf:PATH`` and ``corpus.tokenizer: hf:PATH`` name such a directory.
This module is what the launcher (config validation, ``--dry-run``) and fairseq_ext
(``hf_import``, the HF encoder of data prep) agree on: the ``hf:`` prefix, reading
``config.json``, which ``model_type`` is which btm layout, and whether the model's shape is a
preset's. Everything here reads JSON only, so a login node can check a config before any job.
"""
from __future__ import annotations

import json
from pathlib import Path

from launcher.contract.errors import BtmError

HF_PREFIX = "hf:"
SUPPORTED_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama"}  # HF model_type -> btm layout


def hf_dir(value: str | None) -> Path | None:
    """The directory of an ``hf:PATH`` config value; None for None."""
    if value is None:
        return None
    if not value.startswith(HF_PREFIX) or not value[len(HF_PREFIX):]:
        raise BtmError(f"expected hf:PATH (a local transformers directory), got {value!r}")
    return Path(value[len(HF_PREFIX):])


def read_hf_config(model_dir: Path) -> dict:
    """``MODEL_DIR/config.json`` of a supported model type."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise BtmError(f"{model_dir} has no config.json; is it a transformers model directory?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BtmError(f"cannot read {path}: {e}") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BtmError(f"{path}: model_type {model_type!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def hf_layout(config: dict) -> str:
    return SUPPORTED_MODEL_TYPES[config["model_type"]]


def check_hf_shape(config: dict, preset, model_dir: Path) -> None:
    """The model's layout and shape must be the preset's; the error names both values."""
    layout = hf_layout(config)
    if layout != preset.layout:
        raise BtmError(f"{model_dir}/config.json: model_type {config['model_type']!r} is the "
                       f"{layout} layout, but preset {preset.name!r} is the {preset.layout} layout")
    if layout == "gpt2":
        dim = config.get("n_embd")
        shape = [("n_layer", config.get("n_layer"), preset.layers),
                 ("n_embd", dim, preset.embed_dim), ("n_head", config.get("n_head"), preset.heads),
                 ("n_inner", config.get("n_inner") or 4 * (dim or 0), preset.ffn_dim)]
        positions = ("n_positions", config.get("n_positions", 0))
    else:
        heads = config.get("num_attention_heads")
        shape = [("num_hidden_layers", config.get("num_hidden_layers"), preset.layers),
                 ("hidden_size", config.get("hidden_size"), preset.embed_dim),
                 ("num_attention_heads", heads, preset.heads),
                 ("num_key_value_heads", config.get("num_key_value_heads") or heads,
                  preset.key_value_heads),
                 ("intermediate_size", config.get("intermediate_size"), preset.ffn_dim),
                 ("tie_word_embeddings", bool(config.get("tie_word_embeddings", True)),
                  preset.tie_embeddings)]
        positions = ("max_position_embeddings", config.get("max_position_embeddings", 0))
    for what, model_value, preset_value in shape:
        if model_value != preset_value:
            raise BtmError(f"{model_dir}/config.json: {what} is {model_value}, but preset "
                           f"{preset.name!r} has {preset_value}; choose the preset of this model's shape")
    if (positions[1] or 0) < preset.tokens_per_sample:
        raise BtmError(f"{model_dir}/config.json: {positions[0]} is {positions[1]}, fewer than "
                       f"preset {preset.name!r}'s tokens_per_sample {preset.tokens_per_sample}")


def hf_vocab_rows(config: dict, model_dir: Path) -> int:
    """Rows of the model's embedding matrix (``vocab_size``)."""
    rows = config.get("vocab_size")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise BtmError(f"{model_dir}/config.json: vocab_size is {rows!r}, not a positive integer")
    return rows


def hf_tokenizer_size(tokenizer_dir: Path) -> int:
    """Ids of ``TOKENIZER_DIR/tokenizer.json`` (largest id + 1, added tokens included), read as
    JSON: the ``tokenizers`` library is not needed to check a config."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise BtmError(f"{tokenizer_dir} has no tokenizer.json (a fast tokenizer of the "
                       "`tokenizers` library); save the tokenizer with save_pretrained")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in data.get("added_tokens") or []]
        return max(ids) + 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BtmError(f"cannot read the vocabulary of {path}: {e!r}") from None


# What data prep reads of a tokenizer directory (fairseq_ext.encoders): the vocabulary, the
# special tokens' names, and the embedding's rows.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


def hf_tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    return [Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]


def hf_files(model_dir: Path) -> list[Path]:
    """The regular files of a model directory (what a run that imports it depends on)."""
    return sorted(p for p in Path(model_dir).iterdir() if p.is_file() and not p.name.startswith("."))
