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

from fairseq_ext.merging.method import MergeMethod, check_density, check_lambda


@dataclass(frozen=True)
class TiesParams:
    density: float = 0.2  # fraction of each task vector kept (by magnitude)
    lambda_: float = 1.0  # scale of the merged task vector

    def __post_init__(self):
        check_density("ties", self.density)
        check_lambda("ties", self.lambda_)


def trim_by_magnitude(delta, density: float):
    """``delta`` (modified in place) with all but its k = max(1, int(density * numel)) largest
    magnitudes set to 0 (entries tied with the k-th largest are kept too)."""
    import torch

    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    k = max(1, int(density * n))
    # numpy's in-place partition finds the k-th largest magnitude with one copy of the tensor
    # (torch's topk and kthvalue need several).
    magnitudes = delta.reshape(-1).abs().numpy()
    magnitudes.partition(n - k)
    threshold = float(magnitudes[n - k])
    del magnitudes
    return delta.masked_fill_(delta.abs() < threshold, 0.0)


def elect_sign_and_merge(deltas, weights, shape):
    """Steps 2 and 3 in one pass over ``deltas``: per entry, the weighted mean of the deltas
    whose sign agrees with the sign of their weighted sum (0 where none agrees)."""
    import torch

    # Positive and negative parts kept apart so one pass suffices: the elected sign is that
    # of pos_sum + neg_sum, and each side already holds its agreeing mass and weight.
    pos_sum, neg_sum = torch.zeros(shape), torch.zeros(shape)
    pos_weight, neg_weight = torch.zeros(shape), torch.zeros(shape)
    for w, d in zip(weights, deltas):
        pos_weight.add_(d > 0, alpha=w)
        neg_weight.add_(d < 0, alpha=w)
        pos_sum.add_(d.clamp(min=0), alpha=w)
        neg_sum.add_(d.clamp_(max=0), alpha=w)
        del d
    up = (pos_sum + neg_sum) >= 0
    agreeing = torch.where(up, pos_sum, neg_sum, out=pos_sum)
    del neg_sum
    weight = torch.where(up, pos_weight, neg_weight, out=pos_weight)
    del neg_weight, up
    return agreeing.div_(weight).masked_fill_(weight == 0, 0.0)


def merge_ties(base, experts, weights, params: TiesParams, rng):
    trimmed = (trim_by_magnitude(x.sub_(base), params.density) for x in experts)
    return elect_sign_and_merge(trimmed, weights, base.shape).mul_(params.lambda_).add_(base)


METHOD = MergeMethod(name="ties", params=TiesParams, merge=merge_ties, needs_base=True,
                     reference="https://arxiv.org/abs/2306.01708")
