"""Score one expert on one data split, once: per-token log-probs cached in an .npz.

Every evaluation in btm (single experts, ensembles, top-k, priors, parameter averages) is a
function of these per-token scores, so each (checkpoint, split, context settings) costs one
pass of forward passes and everything after it is numpy (``fairseq_ext/ensemble.py``).

What is scored, exactly (``ContextSettings``). A split is the documents of
``DATA_DIR/<domain>/<split>.bin|.idx`` (one item = one document's tokens + eos). Every token is
a target, predicted from the tokens before it in its *stream*; the input stream is the target
stream shifted right by one with eos in front (fairseq's ``TokenBlockDataset``). With
``reset_at_doc`` each document is its own stream (its first token is predicted from eos
alone); without it the whole split is one stream, as ``fairseq-eval-lm`` (break mode ``none``)
reads it. A stream is cut into blocks of ``tokens_per_sample - context_window`` new targets;
each block is fed with up to ``context_window`` earlier tokens of its stream in front, exactly
like ``fairseq-eval-lm --context-window`` (tokens_per_sample includes the context). So with
``reset_at_doc=False`` the perplexity equals ``fairseq-eval-lm``'s on the same settings
(tests/test_scoring.py checks it), and with ``reset_at_doc=True`` it equals running
``fairseq-eval-lm`` on each document alone.

Cost accounting: ``forward_passes`` counts sequences (blocks of at most tokens_per_sample
tokens) run through the expert; it is 0 when the scores came from the cache.
"""
from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from launcher.contract.atomic import atomic_path, sha256_bytes, sha256_file
from launcher.contract.data_manifest import dataset_hash, read_data_manifest
from launcher.contract.errors import BtmError
from launcher.contract.names import validate_name

SCORES_FORMAT = 1


@dataclass(frozen=True)
class ContextSettings:
    tokens_per_sample: int | None = field(default=None, metadata={
        "help": "tokens per model input, context included (None: the model's max positions)"})
    context_window: int = field(default=0, metadata={
        "help": "earlier tokens fed in front of each block, like fairseq-eval-lm --context-window"})
    reset_at_doc: bool = field(default=True, metadata={
        "help": "score each document as its own stream (no context from earlier documents)"})
    max_docs: int | None = field(default=None, metadata={
        "help": "score only the first this many documents of the split (None: all)"})

    def validate(self) -> "ContextSettings":
        if self.tokens_per_sample is not None and self.tokens_per_sample < 1:
            raise BtmError(f"tokens_per_sample must be at least 1, got {self.tokens_per_sample}")
        if self.context_window < 0:
            raise BtmError(f"context_window must be >= 0, got {self.context_window}")
        if self.tokens_per_sample is not None and self.context_window >= self.tokens_per_sample:
            raise BtmError(f"context_window ({self.context_window}) must be smaller than "
                           f"tokens_per_sample ({self.tokens_per_sample})")
        if self.max_docs is not None and self.max_docs < 1:
            raise BtmError(f"max_docs must be at least 1, got {self.max_docs}")
        return self


@dataclass
class Scores:
    """Per-token scores of one expert on one split.

    logprobs: float32 [T] natural-log p(x_t | context) of every target token, document order.
    doc_starts: int64 [D] offsets in ``logprobs`` where documents begin.
    targets: int32 [T] the target token ids (for checks and c-BTM routing).
    key: what the scores depend on (checkpoint sha256, data hash, context settings).
    forward_passes: sequences run through the model to produce them (0 on a cache hit).
    """
    logprobs: np.ndarray
    doc_starts: np.ndarray
    targets: np.ndarray
    key: dict
    path: Path
    forward_passes: int = 0
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return int(self.logprobs.shape[0])

    @property
    def nll(self) -> float:
        return float(-np.mean(self.logprobs, dtype=np.float64))


# ----------------------------------------------------------------------------- data

def data_hash(data_dir: str | os.PathLike, domain: str, split: str) -> str:
    """The ``data_hash`` of ``<domain>/<split>`` from ``DATA_DIR/manifest.json``."""
    return dataset_hash(data_dir, read_data_manifest(data_dir), domain, split)


def read_split(data_dir: str | os.PathLike, domain: str, split: str,
               max_docs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [T] int64, doc_starts [D] int64) of a split, documents in order."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    prefix = Path(data_dir) / domain / split
    for suffix in (".bin", ".idx"):
        if not Path(str(prefix) + suffix).exists():
            raise BtmError(f"missing data file {prefix}{suffix}")
    dataset = MMapIndexedDataset(str(prefix))
    n_docs = len(dataset) if max_docs is None else min(max_docs, len(dataset))
    if n_docs == 0:
        raise BtmError(f"{prefix}.bin has no documents")
    sizes = np.asarray(dataset.sizes[:n_docs], dtype=np.int64)
    tokens = np.concatenate([np.asarray(dataset[i], dtype=np.int64) for i in range(n_docs)])
    doc_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return tokens, doc_starts


def plan_blocks(n_tokens: int, doc_starts: np.ndarray, tokens_per_sample: int, context_window: int,
                reset_at_doc: bool) -> list[tuple[int, int, int]]:
    """Blocks as (input_start, target_start, end) over the global token array: the model reads
    inputs [input_start, end) and the block scores targets [target_start, end)."""
    step = tokens_per_sample - context_window
    streams = (list(zip(doc_starts.tolist(), doc_starts[1:].tolist() + [n_tokens])) if reset_at_doc
               else [(0, n_tokens)])
    blocks = []
    for s0, s1 in streams:
        for a in range(s0, s1, step):
            blocks.append((max(s0, a - context_window), a, min(a + step, s1)))
    return blocks


# ----------------------------------------------------------------------------- cache

def checkpoint_sha256(path: str | os.PathLike) -> str:
    """The checkpoint's sha256 for cache keys: its ``.sha256`` sidecar (written with it by
    ``fairseq_ext.checkpoint.save_checkpoint``) when that is at least as new as the file, else
    a full hash. Hashing a multi-GB checkpoint costs seconds; a cache hit should not."""
    path = Path(path)
    side = Path(str(path) + ".sha256")
    try:
        if side.stat().st_mtime_ns >= path.stat().st_mtime_ns:
            digest = side.read_text().split()[0] if side.read_text().strip() else ""
            if len(digest) == 64:
                return digest
    except OSError:
        pass
    return sha256_file(path)


def cache_key(checkpoint_digest: str, data_digest: str, context: ContextSettings) -> dict:
    return {"format": SCORES_FORMAT, "checkpoint_sha256": checkpoint_digest, "data_hash": data_digest,
            "context": asdict(context)}


def cache_path(cache_dir: str | os.PathLike, domain: str, split: str, key: dict) -> Path:
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode())[:16]
    return Path(cache_dir) / f"{domain}.{split}.{key['checkpoint_sha256'][:12]}.{digest}.npz"


def load_cached(path: Path, key: dict) -> Scores | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = json.loads(str(z["key"]))
            if stored != key:
                return None
            return Scores(logprobs=z["logprobs"], doc_starts=z["doc_starts"], targets=z["targets"],
                          key=stored, path=path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # A damaged cache entry (a truncated .npz is a BadZipFile) is derived data: score again
        # and overwrite it, saying so.
        print(f"btm: warning: score cache {path} cannot be read ({type(e).__name__}: {e}); scoring again "
              "and rewriting it", file=sys.stderr)
        return None


def save_scores(path: Path, scores: Scores) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, logprobs=scores.logprobs, doc_starts=scores.doc_starts,
                     targets=scores.targets, key=np.array(json.dumps(scores.key, sort_keys=True)))


# ----------------------------------------------------------------------------- scoring

def score_split(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, domain: str, split: str, *,
                cache_dir: str | os.PathLike, context: ContextSettings = ContextSettings(),
                device: str = "cpu", batch_size: int = 8, checkpoint_sha: str | None = None,
                trust_pickle: bool = False) -> Scores:
    """Per-token log-probs of ``checkpoint`` on ``DATA_DIR/<domain>/<split>``, from the cache
    when the (checkpoint sha256, data hash, context settings) were scored before.
    ``checkpoint_sha``: the checkpoint's sha256 if the caller already has it. ``trust_pickle``
    lets a checkpoint that needs pickle load (``--trust-checkpoint``); it does not change the
    scores, so it is not part of the cache key."""
    validate_name(domain, "domain")
    validate_name(split, "split")
    context = context.validate()
    if batch_size < 1:
        raise BtmError(f"batch_size must be at least 1, got {batch_size}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise BtmError(f"checkpoint not found: {checkpoint}")
    key = cache_key(checkpoint_sha or checkpoint_sha256(checkpoint), data_hash(data_dir, domain, split), context)
    path = cache_path(cache_dir, domain, split, key)
    cached = load_cached(path, key)
    if cached is not None:
        return cached

    started = time.perf_counter()
    tokens, doc_starts = read_split(data_dir, domain, split, context.max_docs)
    from fairseq_ext.checkpoint import load_model

    loaded = load_model(checkpoint, device, trust_pickle=trust_pickle)
    check_dictionary(loaded.dictionary, data_dir, checkpoint)
    logprobs, passes = forward_logprobs(loaded.model, tokens, doc_starts, context,
                                        eos=loaded.dictionary.eos(), pad=loaded.dictionary.pad(),
                                        device=device, batch_size=batch_size)
    scores = Scores(logprobs=logprobs, doc_starts=doc_starts, targets=tokens.astype(np.int32), key=key,
                    path=path, forward_passes=passes, seconds=time.perf_counter() - started)
    save_scores(path, scores)
    return scores


def check_dictionary(dictionary, data_dir: str | os.PathLike, checkpoint: Path) -> None:
    from fairseq.data import Dictionary

    dict_path = Path(data_dir) / "dict.txt"
    if not dict_path.exists():
        raise BtmError(f"missing dictionary {dict_path}")
    data_dict = Dictionary.load(str(dict_path))
    if list(data_dict.symbols) != list(dictionary.symbols):
        raise BtmError(f"checkpoint {checkpoint} was trained with a different dictionary than "
                       f"{dict_path} ({len(dictionary)} vs {len(data_dict)} symbols)")


def forward_logprobs(model, tokens: np.ndarray, doc_starts: np.ndarray, context: ContextSettings, *,
                     eos: int, pad: int, device: str = "cpu", batch_size: int = 8) -> tuple[np.ndarray, int]:
    """Run ``model`` over the blocks of ``tokens``; return (float32 [T] log-probs, blocks run).

    Log-softmax is taken in fp32; on a GPU the forward pass runs under bf16 autocast.
    """
    import torch

    tps = context.tokens_per_sample or int(model.max_positions())
    if tps > int(model.max_positions()):
        raise BtmError(f"tokens_per_sample {tps} exceeds the model's {model.max_positions()} positions")
    if context.context_window >= tps:
        raise BtmError(f"context_window ({context.context_window}) must be smaller than tokens_per_sample ({tps})")
    inputs = np.empty_like(tokens)  # the input stream: targets shifted right, eos in front
    inputs[1:] = tokens[:-1]
    inputs[0] = eos
    if context.reset_at_doc:
        inputs[doc_starts] = eos
    blocks = plan_blocks(len(tokens), doc_starts, tps, context.context_window, context.reset_at_doc)
    blocks.sort(key=lambda b: b[0] - b[2])  # longest first: less padding per batch
    out = np.zeros(len(tokens), dtype=np.float32)
    dev = torch.device(device)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i:i + batch_size]
            width = max(end - start for start, _, end in batch)
            src = np.full((len(batch), width), pad, dtype=np.int64)
            tgt = np.full((len(batch), width), pad, dtype=np.int64)
            for row, (start, _, end) in enumerate(batch):
                src[row, :end - start] = inputs[start:end]
                tgt[row, :end - start] = tokens[start:end]
            src_t = torch.from_numpy(src).to(dev)
            with autocast:
                logits = model(src_t)[0]
            lp = torch.log_softmax(logits.float(), dim=-1)
            lp = lp.gather(-1, torch.from_numpy(tgt).to(dev).unsqueeze(-1)).squeeze(-1).cpu().numpy()
            for row, (start, first, end) in enumerate(batch):
                out[first:end] = lp[row, first - start:end - start]
    return out, len(blocks)
