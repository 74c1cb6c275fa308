"""Task arithmetic: base + lambda * sum_i w_i (x_i - base) (Ilharco et al., "Editing models
with task arithmetic", ICLR 2023, https://arxiv.org/abs/2212.04089).

The paper adds task vectors tau_i = x_i - base scaled by one lambda chosen on held-out data;
here the experts' weights (summing to 1) weight the task vectors and lambda scales their sum.
Default lambda = 1.0, mergekit's default: with weights summing to 1 it is the weighted average
of the experts, written around the base.
"""
from __future__ import annotations

from dataclasses import dataclass

from fairseq_ext.merging.method import MergeMethod, check_lambda


@dataclass(frozen=True)
class TaskArithmeticParams:
    lambda_: float = 1.0  # scale of the summed task vector

    def __post_init__(self):
        check_lambda("task_arithmetic", self.lambda_)


def merge_task_arithmetic(base, experts, weights, params: TaskArithmeticParams, rng):
    import torch

    summed = torch.zeros_like(base)
    for w, x in zip(weights, experts):
        summed.add_(x.sub_(base), alpha=w)
    return summed.mul_(params.lambda_).add_(base)


METHOD = MergeMethod(name="task_arithmetic", params=TaskArithmeticParams,
                     merge=merge_task_arithmetic, needs_base=True,
                     reference="https://arxiv.org/abs/2212.04089")
