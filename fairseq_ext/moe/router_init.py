"""The router's start from data: row j of layer i's router is the mean input of layer i's FFN
when expert j itself reads a sample of its own domain (BTX's "each expert's mean hidden state"),
scaled to unit length so that no expert wins tokens by the norm of its hidden states alone.

One expert model is in memory at a time (``build.py`` calls this inside its stream over the
experts); the sample is the first ``max_tokens`` tokens of the domain's split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fairseq_ext.streams import IGNORED_TARGET
from launcher.contract.errors import BtmError


@dataclass
class RouterSample:
    """Where each expert's sample comes from: ``domains[j]`` is expert j's own domain."""

    data_dir: str
    domains: list[str]
    split: str = "train"
    max_tokens: int = 16384
    batch_size: int = 8


def domain_blocks(data_dir, domain: str, split: str, max_tokens: int | None, tokens_per_sample: int,
                  pad: int):
    """(inputs, targets) blocks of the first ``max_tokens`` tokens (None: all) of ``domain/split``."""
    from fairseq_ext.streams import eval_blocks, read_tokens

    tokens = read_tokens(os.path.join(str(data_dir), domain, split))
    if max_tokens is not None:
        tokens = tokens[:max_tokens + 1]
    if len(tokens) < 2:
        raise BtmError(f"{os.path.join(str(data_dir), domain, split)} holds no tokens to sample")
    return eval_blocks(tokens, tokens_per_sample, pad)


def mean_ffn_inputs(checkpoint, domain: str, sample: RouterSample, *,
                    trust_pickle: bool = False) -> torch.Tensor:
    """[layers, dim] float32: the mean over ``domain``'s sample tokens of each layer's FFN input
    in the dense expert ``checkpoint``."""
    from fairseq_ext.checkpoint import load_model

    loaded = load_model(checkpoint, trust_pickle=trust_pickle)
    model, pad = loaded.model, loaded.dictionary.pad()
    inputs, targets = domain_blocks(sample.data_dir, domain, sample.split, sample.max_tokens,
                                    model.max_positions(), pad)
    layers = model.decoder.layers
    sums = torch.zeros(len(layers), model.decoder.cfg.decoder_embed_dim, dtype=torch.float64)
    mask = None

    def hook(index):
        def accumulate(_module, args):
            sums[index] += (args[0].double() * mask.unsqueeze(-1)).sum((0, 1))
        return accumulate

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    count = 0
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), sample.batch_size):
                x = inputs[start:start + sample.batch_size]
                mask = (targets[start:start + sample.batch_size] != IGNORED_TARGET).double()
                count += int(mask.sum())
                model(x)
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).float()


def router_rows(means: list[torch.Tensor]) -> torch.Tensor:
    """[layers, N, dim]: the experts' mean hidden states (each [layers, dim]), unit length."""
    stacked = torch.stack(means, dim=1)
    return stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-12)
