"""TIES: trim, elect sign, disjoint merge (Yadav et al., "TIES-Merging: Resolving
interference when merging models", NeurIPS 2023, https://arxiv.org/abs/2306.01708).

For each parameter tensor:
1. trim: each task vector tau_i = x_i - base keeps its k = max(1, int(density * numel)) entries
   of largest magnitude, the others become 0;
2. elect sign: per entry, gamma = sign(sum_i w_i tau_i) over the trimmed vectors (>= 0 counts as
   +), the weighted form of the paper's "mass" election, as in mergekit;
3. disjoint merge: per entry, the w-weighted mean of the trimmed tau_i whose sign is gamma
   (zeros take no part; an entry no expert keeps stays 0);
and the result is base + lambda * merged.

Defaults from the paper's recommendation when there is no validation set to tune on (Sec. 6,
"keep the top-20% and lambda = 1"): density 0.2, lambda 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass

from fairseq_ext.merging.registry import MergeMethod, check_density, check_lambda


@dataclass(frozen=True)
class TiesParams:
    density: float = 0.2  # fraction of each task vector kept (by magnitude)
    lambda_: float = 1.0  # scale of the merged task vector

    def __post_init__(self):
        check_density("ties", self.density)
        check_lambda("ties", self.lambda_)


def trim_by_magnitude(delta, density: float):
    """``delta`` with all but its k = max(1, int(density * numel)) largest-magnitude entries 0."""
    import torch

    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.reshape(-1).abs().topk(k, sorted=False).indices] = True
    return torch.where(keep.view(delta.shape), delta, 0.0)


def elect_sign_and_merge(deltas, weights, shape):
    """Steps 2 and 3 in one pass over ``deltas``: per entry, the weighted mean of the deltas
    whose sign agrees with the sign of their weighted sum (0 where none agrees)."""
    import torch

    # Positive and negative parts kept apart so one pass suffices: the elected sign is that
    # of pos_sum + neg_sum, and each side already holds its agreeing mass and weight.
    pos_sum, neg_sum = torch.zeros(shape), torch.zeros(shape)
    pos_weight, neg_weight = torch.zeros(shape), torch.zeros(shape)
    for w, d in zip(weights, deltas):
        pos_sum.add_(d.clamp(min=0) * w)
        neg_sum.add_(d.clamp(max=0) * w)
        pos_weight.add_((d > 0) * w)
        neg_weight.add_((d < 0) * w)
    up = (pos_sum + neg_sum) >= 0
    agreeing = torch.where(up, pos_sum, neg_sum)
    del pos_sum, neg_sum
    weight = torch.where(up, pos_weight, neg_weight)
    del pos_weight, neg_weight
    return torch.where(weight > 0, agreeing / weight, 0.0)


def merge_ties(base, experts, weights, params: TiesParams, rng):
    trimmed = (trim_by_magnitude(x - base, params.density) for x in experts)
    return base + params.lambda_ * elect_sign_and_merge(trimmed, weights, base.shape)


METHOD = MergeMethod(name="ties", params=TiesParams, merge=merge_ties, needs_base=True,
                     reference="https://arxiv.org/abs/2306.01708")
