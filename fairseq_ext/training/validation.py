"""Validation: the mean next-token loss (nats) per domain, each target token counted once.

``fairseq_ext.train`` re-exports ``evaluate`` and must stay importable without torch (the
launcher builds a ``TrainSpec`` in processes that never train), hence the imports inside.
"""
from __future__ import annotations

import os


def evaluate(model, data_dir: str, domains: list[str], tokens_per_sample: int, pad: int,
             device, *, split: str = "valid", max_tokens: int | None = None,
             batch_size: int = 16, autocast_dtype=None) -> dict[str, float]:
    """Mean next-token loss (nats) per domain over ``split`` (each target token once)."""
    import torch

    from fairseq_ext.streams import IGNORED_TARGET, eval_blocks, read_tokens

    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for d in domains:
            tokens = read_tokens(os.path.join(data_dir, d, split))
            if max_tokens is not None:
                tokens = tokens[:max_tokens + 1]
            inputs, targets = eval_blocks(tokens, tokens_per_sample, pad)
            total, count = 0.0, 0
            for i in range(0, len(inputs), batch_size):
                x = inputs[i:i + batch_size].to(device)
                y = targets[i:i + batch_size].to(device)
                with torch.autocast(device.type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    total += float(_summed_loss(model, x, y))
                count += int((y != IGNORED_TARGET).sum())
            out[d] = total / max(count, 1)
    model.train(was_training)
    return out


def validate_run(setup, model) -> tuple[dict[str, float], float]:
    """A training run's validation: per-domain losses on its own domains, and their mean (which
    picks ``checkpoint_best``)."""
    import numpy as np

    spec = setup.spec
    losses = evaluate(model, spec.data_dir, spec.domains, setup.tokens_per_sample, setup.pad,
                      setup.ranks.device, max_tokens=spec.valid_max_tokens,
                      autocast_dtype=setup.autocast_dtype)
    return losses, float(np.mean(list(losses.values())))


def _summed_loss(model, x, y):
    """ELM's chunked loss, or full logits for other fairseq LMs (e.g. stock transformer_lm)."""
    import torch.nn.functional as F

    from fairseq_ext.streams import IGNORED_TARGET

    if hasattr(model, "lm_loss"):
        return model.lm_loss(x, y)
    logits = model(x)[0].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                           ignore_index=IGNORED_TARGET, reduction="sum")
