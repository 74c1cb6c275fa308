"""The numbers each update uses: its learning rate and the dropout seeds of its micro-batches.

Both are pure functions of plain integers, which is what makes a resumed run repeat the
uninterrupted one: nothing here depends on state that a checkpoint would have to carry.
"""
from __future__ import annotations

import numpy as np


def lr_at(update: int, peak: float, total: int, warmup_fraction: float) -> float:
    """Linear warmup to ``peak`` over ``warmup_fraction * total`` updates, then linear decay to 0."""
    warmup = max(1, round(warmup_fraction * total))
    if update < warmup:
        return peak * (update + 1) / warmup
    return peak * max(0.0, (total - update) / max(1, total - warmup))


def micro_seed(seed: int, update: int, index: int) -> int:
    """The torch seed of micro-batch ``index`` of update ``update`` (dropout masks)."""
    return int(np.random.SeedSequence([seed, update, index]).generate_state(1)[0])
