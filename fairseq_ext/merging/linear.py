"""Linear: the weighted average of the experts, sum_i w_i x_i (Wortsman et al., "Model soups",
ICML 2022, https://arxiv.org/abs/2203.05482; BTM's parameter average, Li et al. 2022,
https://arxiv.org/abs/2208.03306).

BTM's uniform, argmax and posterior averages are this rule with uniform, one-hot and
domain-posterior weights. The arithmetic is exact and fixed so that an average reproduces bit
for bit: ``acc = acc + float32(w_i) * x_i`` in the experts' order, starting from zeros, in fp32
(the product is rounded before the add).
"""
from __future__ import annotations

from dataclasses import dataclass

from fairseq_ext.merging.method import MergeMethod


@dataclass(frozen=True)
class LinearParams:
    """No parameters: the weights are the whole rule."""


def merge_linear(base, experts, weights, params: LinearParams, rng):
    import torch

    acc = None
    for w, x in zip(weights, experts):
        if acc is None:
            acc = torch.zeros(x.shape, dtype=torch.float32)
        acc.add_(x.mul_(torch.tensor(w, dtype=torch.float32)))
    return acc


METHOD = MergeMethod(name="linear", params=LinearParams, merge=merge_linear, needs_base=False,
                     reference="https://arxiv.org/abs/2203.05482")
