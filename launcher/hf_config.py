"""The config keys that point a run at Hugging Face directories, checked before any job runs.

``model.init: hf:PATH`` makes a local transformers model the seed LM; ``corpus.tokenizer:
hf:PATH`` makes data prep encode with that model's tokenizer; ``model.arch`` names the layout
(``gpt2`` | ``llama``) and must be the preset's. ``validate_hf_keys`` checks the values
(config parsing); ``check_hf_sources`` reads the directories' JSON (no torch) once the paths
are resolved, so ``btm run --dry-run`` already names a shape or vocabulary that does not fit.
"""
from __future__ import annotations

from pathlib import Path

from launcher.contract.errors import BtmError
from launcher.contract.hf_model import (HF_PREFIX, check_hf_shape, hf_dir, hf_tokenizer_size,
                                        hf_vocab_rows, read_hf_config)
from launcher.contract.presets import LAYOUT_MODELS, PRESETS

HF_KEYS = (("model", "init"), ("corpus", "tokenizer"))


def validate_hf_keys(cfg, err) -> None:
    """The values' form and how they fit the preset; ``err(key, message)`` raises."""
    arch = cfg.model.arch
    if arch is not None:
        if arch not in LAYOUT_MODELS:
            err("model.arch", f"unknown arch {arch!r}; use {' or '.join(LAYOUT_MODELS)}")
        preset = PRESETS.get(cfg.model.preset)
        if preset is not None and preset.layout != arch:
            err("model.arch", f"arch {arch!r} does not match preset {preset.name!r}, which is the "
                              f"{preset.layout} layout; choose a {arch} preset "
                              f"({', '.join(p.name for p in PRESETS.values() if p.layout == arch)})")
    for section, key in HF_KEYS:
        try:
            hf_dir(getattr(getattr(cfg, section), key))
        except BtmError as e:
            err(f"{section}.{key}", str(e))
    if cfg.model.init is not None and cfg.corpus.tokenizer is None:
        err("model.init", "a pretrained seed needs its own token ids: set corpus.tokenizer: "
                          "hf:PATH (usually the same directory); a sentencepiece vocabulary "
                          "trained by btm would not match the model's embeddings")


def resolve_hf_paths(cfg, base: Path) -> None:
    """A relative ``hf:PATH`` is relative to the config file's directory (like corpus.path)."""
    for section, key in HF_KEYS:
        part = getattr(cfg, section)
        path = hf_dir(getattr(part, key))
        if path is not None and not path.is_absolute():
            setattr(part, key, f"{HF_PREFIX}{(base / path).resolve()}")


def check_hf_sources(cfg) -> None:
    """The directories exist, the model has the preset's shape, the tokenizer fits its embedding."""
    tokenizer_dir, model_dir = hf_dir(cfg.corpus.tokenizer), hf_dir(cfg.model.init)
    for key, path in (("corpus.tokenizer", tokenizer_dir), ("model.init", model_dir)):
        if path is not None and not path.is_dir():
            raise BtmError(f"{cfg.source}: {key}: directory not found: {path}")
    try:
        size = hf_tokenizer_size(tokenizer_dir) if tokenizer_dir else None
    except BtmError as e:
        raise BtmError(f"{cfg.source}: corpus.tokenizer: {e}") from None
    if model_dir is None:
        return
    try:
        config = read_hf_config(model_dir)
        check_hf_shape(config, PRESETS[cfg.model.preset], model_dir)
        rows = hf_vocab_rows(config, model_dir)
    except BtmError as e:
        raise BtmError(f"{cfg.source}: model.init: {e}") from None
    if size is not None and size > rows:
        raise BtmError(f"{cfg.source}: corpus.tokenizer: {tokenizer_dir}/tokenizer.json has {size} "
                       f"ids but model.init's embedding ({model_dir}/config.json vocab_size) has "
                       f"{rows} rows; use the model's own tokenizer")
