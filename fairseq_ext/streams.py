"""Token-block streams over the prepared data for btm's trainer (numpy + torch, no fairseq).

A domain's ``<split>.bin`` is its documents' tokens back to back (each ending in eos), so the
whole split is one flat token array read through ``np.memmap``; the ``.idx`` header only
tells the dtype. Training blocks are non-overlapping windows of ``tokens_per_sample + 1``
tokens at stride ``tokens_per_sample`` (inputs = window[:-1], targets = window[1:]), i.e. the
documents streamed into fixed blocks exactly as fairseq's ``--sample-break-mode none`` does.

The stream is resumable from plain integers: each domain walks a permutation of its blocks
drawn from ``(seed, domain index, epoch)``, and the domain of each sequence of update ``u`` is
drawn from ``(seed, u)``. ``state()`` = per-domain ``(epoch, cursor)``.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import torch

from launcher.contract.errors import BtmError

# The target of a padded position: ignored by the loss and every count of targets. Padding is
# told apart by this value, never by the pad id, because the pad id may be a real token's (a
# GPT-2-family tokenizer pads with eos, docs/data.md); the pad id only fills padded inputs.
IGNORED_TARGET = -100

# fairseq's MMapIndexedDataset header: magic, version, dtype code (see fairseq/data/indexed_dataset.py).
_MAGIC = b"MMIDIDX\x00\x00"
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}


def read_tokens(prefix: str | os.PathLike) -> np.ndarray:
    """The flat token array of ``prefix.bin`` (memory-mapped, read-only)."""
    prefix = str(prefix)
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for p in (idx, bin_):
        if not os.path.isfile(p):
            raise BtmError(f"data file not found: {p}")
    with open(idx, "rb") as f:
        magic = f.read(9)
        if magic != _MAGIC:
            raise BtmError(f"{idx} is not a fairseq mmap index (bad magic {magic!r})")
        struct.unpack("<Q", f.read(8))
        (code,) = struct.unpack("<B", f.read(1))
    if code not in _DTYPES:
        raise BtmError(f"{idx}: unknown token dtype code {code}")
    if os.path.getsize(bin_) == 0:
        return np.zeros(0, dtype=_DTYPES[code])
    return np.memmap(bin_, dtype=_DTYPES[code], mode="r")


class MixtureBlockStream:
    """Batches of ``[batch, tokens_per_sample]`` (inputs, targets) from a domain mixture."""

    def __init__(self, data_dir: str, domains: list[str], probs, tokens_per_sample: int,
                 seed: int, split: str = "train"):
        self.domains = list(domains)
        self.probs = np.asarray(probs, dtype=np.float64)
        self.block = int(tokens_per_sample)
        self.seed = int(seed)
        self.tokens = [read_tokens(os.path.join(data_dir, d, split)) for d in self.domains]
        self.n_blocks = [max((len(t) - 1) // self.block, 0) for t in self.tokens]
        for d, n, p in zip(self.domains, self.n_blocks, self.probs):
            if n == 0 and p > 0:
                raise BtmError(f"domain {d!r} split {split!r} has fewer than "
                               f"{self.block + 1} tokens: nothing to train on")
        self.epochs = [0] * len(self.domains)
        self.cursors = [0] * len(self.domains)
        self._perms: dict[int, np.ndarray] = {}

    def state(self) -> dict:
        return {"epochs": list(self.epochs), "cursors": list(self.cursors)}

    def load_state(self, state: dict) -> None:
        if len(state["epochs"]) != len(self.domains):
            raise BtmError("saved data position does not match the number of domains")
        self.epochs = [int(x) for x in state["epochs"]]
        self.cursors = [int(x) for x in state["cursors"]]
        self._perms.clear()

    def _perm(self, i: int) -> np.ndarray:
        cached = self._perms.get(i)
        if cached is None or cached[0] != self.epochs[i]:
            rng = np.random.default_rng([self.seed, i, self.epochs[i]])
            cached = (self.epochs[i], rng.permutation(self.n_blocks[i]))
            self._perms[i] = cached
        return cached[1]

    def _next_block(self, i: int) -> np.ndarray:
        if self.cursors[i] >= self.n_blocks[i]:
            self.epochs[i] += 1
            self.cursors[i] = 0
        start = int(self._perm(i)[self.cursors[i]]) * self.block
        self.cursors[i] += 1
        return self.tokens[i][start:start + self.block + 1]

    def batch(self, update: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 1_000_003, update])
        choice = rng.choice(len(self.domains), size=batch_size, p=self.probs)
        rows = np.stack([self._next_block(int(i)) for i in choice]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def eval_blocks(tokens: np.ndarray, tokens_per_sample: int, pad: int):
    """Every target token once: windows of ``T + 1`` at stride ``T``, the last one padded
    (inputs with ``pad``, targets with ``IGNORED_TARGET``)."""
    T = tokens_per_sample
    n = len(tokens)
    if n < 2:
        return torch.zeros(0, T, dtype=torch.long), torch.zeros(0, T, dtype=torch.long)
    n_blocks = (n - 1 + T - 1) // T
    rows = np.full((n_blocks, T + 1), pad, dtype=np.int64)
    for b in range(n_blocks):
        piece = tokens[b * T: b * T + T + 1]
        rows[b, :len(piece)] = piece
    real = len(tokens) - 1 - (n_blocks - 1) * T  # targets of the last block
    rows = torch.from_numpy(rows)
    inputs, targets = rows[:, :-1].clone(), rows[:, 1:].clone()
    targets[-1, real:] = IGNORED_TARGET
    return inputs, targets
