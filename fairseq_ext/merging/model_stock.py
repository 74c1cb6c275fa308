"""Model stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models",
ECCV 2024, https://arxiv.org/abs/2403.19522).

Per parameter tensor: with tau_i = x_i - base and cos(theta) the mean pairwise cosine between
the task vectors (the paper uses one angle; for N > 2 mergekit, and this module, take the mean
over pairs), the merge interpolates between the experts' average and the base:

    t = N cos(theta) / (1 + (N - 1) cos(theta)),   merged = t * avg + (1 - t) * base

where avg = sum_i w_i x_i (the paper's uniform mean when the weights are uniform). A task vector
of zero norm has cosine 0 with every other (as mergekit's clamped norm gives). cos(theta) is
clamped to [0, 1]: the paper's geometry assumes non-obtuse angles, and a negative mean cosine
would extrapolate beyond the base. One expert gives t = 1: the expert itself. The method has no
parameters (mergekit's ``filter_wise`` is not offered).
"""
from __future__ import annotations

from dataclasses import dataclass

from fairseq_ext.merging.method import MergeMethod


@dataclass(frozen=True)
class ModelStockParams:
    """No parameters: the interpolation ratio comes from the task vectors' angle."""


def merge_model_stock(base, experts, weights, params: ModelStockParams, rng):
    import torch

    # One pass: the mean pairwise cosine of unit vectors u_i is
    # (|sum_i u_i|^2 - sum_i |u_i|^2) / (N (N - 1)), so no pair needs both tensors at once.
    avg = torch.zeros_like(base)
    unit_sum = torch.zeros_like(base)
    unit_sq = 0.0
    n = 0
    for w, x in zip(weights, experts):
        avg.add_(x, alpha=w)
        delta = x.sub_(base)
        norm = float(delta.norm())
        if norm > 0:
            unit_sum.add_(delta, alpha=1 / norm)
            unit_sq += 1.0
        n += 1
        del delta, x
    if n == 1:
        return avg
    flat = unit_sum.reshape(-1)
    cos = (float(torch.dot(flat, flat)) - unit_sq) / (n * (n - 1))
    cos = min(max(cos, 0.0), 1.0)
    t = n * cos / (1 + (n - 1) * cos)
    return avg.mul_(t).add_(base, alpha=1 - t)


METHOD = MergeMethod(name="model_stock", params=ModelStockParams, merge=merge_model_stock,
                     needs_base=True, reference="https://arxiv.org/abs/2403.19522")
