"""Tiny real inputs for the evaluation tests: a prepared DATA dir and tiny ELM checkpoints.

The data is the real `btm data prepare` output (sentencepiece + fairseq mmap datasets +
manifest.json) of the `small_corpus` fixture. The experts are real ELM checkpoints written by
the model engineer's `fairseq_ext.checkpoint` code: either trained for a few updates with
`fairseq_ext.train.train_lm` or, where a test only needs distinct experts, built at random
init and nudged towards one domain's unigram distribution (fast, deterministic, and different
experts then really prefer different domains).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DOMAINS = ["bible", "code_python", "legal"]


def prepare_tiny_data(corpus: Path, out: Path) -> Path:
    from fairseq_ext.data_prep import prepare_data

    if not (out / "manifest.json").exists():
        prepare_data(corpus, out, domains=DOMAINS, vocab_size=400, workers=1, sample_chars=50_000,
                     progress=False)
    return out


def unigram_logprobs(data_dir: Path, domain: str, vocab: int) -> np.ndarray:
    from fairseq_ext.scoring import read_split

    tokens, _ = read_split(data_dir, domain, "train")
    counts = np.bincount(tokens, minlength=vocab).astype(np.float64) + 0.5
    return np.log(counts / counts.sum())


def make_expert(data_dir: Path, out: Path, *, domain: str | None, seed: int = 0,
                tokens_per_sample: int = 64) -> Path:
    """A tiny ELM checkpoint at random init (``seed``); with ``domain`` it is nudged so that it
    predicts roughly that domain's unigram distribution everywhere (see below)."""
    import torch
    from fairseq.data import Dictionary

    from fairseq_ext.checkpoint import build_model_from_cfg, make_cfg, make_state, save_checkpoint
    from fairseq_ext.models.elm import ElmConfig

    if out.exists():
        return out
    torch.manual_seed(seed)
    dictionary = Dictionary.load(str(data_dir / "dict.txt"))
    model_cfg = ElmConfig(decoder_layers=1, decoder_embed_dim=32, decoder_attention_heads=2,
                          decoder_ffn_embed_dim=64, max_target_positions=tokens_per_sample)
    model_cfg._name = "elm_tiny"
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig

    cfg = make_cfg(model_cfg, MultidomainLMConfig(data=str(data_dir)))
    model = build_model_from_cfg(cfg["model"], dictionary)
    if domain is not None:
        # Tied embeddings: logits = h @ E^T. Put the domain's unigram log-probs on one embedding
        # coordinate and make the final LayerNorm output a constant there, so every position
        # predicts (roughly) that unigram distribution.
        uni = torch.tensor(unigram_logprobs(data_dir, domain, len(dictionary)), dtype=torch.float32)
        dec = model.decoder
        with torch.no_grad():
            dec.embed_tokens.weight[:, 0] = uni - uni.mean()
            dec.ln_f.weight[0] = 0.0
            dec.ln_f.bias[0] = 1.0
    save_checkpoint(make_state(model.state_dict(), cfg, dictionary), out)
    return out


# ----------------------------------------------------------------------------- pytest fixtures
# Imported by the test modules that use them; the files live under pytest's session base temp
# directory and are built once per session (the builders skip what already exists).

import pytest  # noqa: E402


@pytest.fixture
def tiny_data(small_corpus, tmp_path_factory) -> Path:
    import importlib.util

    from conftest import require, require_fairseq

    require_fairseq()
    for module in ("fairseq_ext.data_prep", "fairseq_ext.checkpoint", "fairseq_ext.models.elm"):
        require(importlib.util.find_spec(module) is not None, f"{module} is not on this branch yet")
    return prepare_tiny_data(small_corpus, tmp_path_factory.getbasetemp() / "eval_data")


@pytest.fixture
def tiny_experts(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """One nudged expert per domain of DOMAINS, name = domain."""
    out = tmp_path_factory.getbasetemp() / "eval_experts"
    out.mkdir(exist_ok=True)
    return {d: make_expert(tiny_data, out / f"{d}.pt", domain=d, seed=i) for i, d in enumerate(DOMAINS)}
