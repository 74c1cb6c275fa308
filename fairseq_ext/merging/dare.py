"""DARE: drop and rescale task vectors (Yu et al., "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099).

Each task vector tau_i = x_i - base keeps every entry independently with probability density
(= 1 - the paper's drop rate p) and the kept entries are divided by density, so that the
expected task vector is unchanged. Two ways to combine the sparse vectors, as in the paper and
mergekit:

* ``dare_linear``: base + lambda * sum_i w_i drop(tau_i);
* ``dare_ties``: base + lambda * TIES's sign election and disjoint mean over drop(tau_i) (the
  paper applies DARE before TIES-Merging; mergekit's dare_ties defaults to not dividing by the
  agreeing weight, here the disjoint mean is kept as in TIES).

The drop is random but reproducible: the driver seeds ``rng`` from the run's seed and the
parameter's name, and expert i's mask is the i-th draw of ``drop_mask`` from it.

Defaults: density 0.5 (mergekit's example configurations; the paper shows drop rates up to 0.9
work for fine-tuned deltas of small magnitude but fail for deltas as large as continued
pre-training gives, which is what BTM experts are), lambda 1.0 (mergekit's default).
"""
from __future__ import annotations

from dataclasses import dataclass

from fairseq_ext.merging.method import MergeMethod, check_density, check_lambda
from fairseq_ext.merging.ties import elect_sign_and_merge


@dataclass(frozen=True)
class DareParams:
    density: float = 0.5  # probability that an entry of a task vector is kept
    lambda_: float = 1.0  # scale of the merged task vector

    def __post_init__(self):
        check_density("dare", self.density)
        check_lambda("dare", self.lambda_)


def drop_mask(shape, density: float, generator):
    """Which entries survive the drop: independent Bernoulli(density) draws from ``generator``."""
    import torch

    return torch.rand(shape, generator=generator) < density


def drop_and_rescale(delta, density: float, generator):
    """``delta`` (modified in place) with the dropped entries 0, the kept ones / ``density``."""
    if density >= 1:
        return delta
    keep = drop_mask(delta.shape, density, generator)
    return delta.div_(density).masked_fill_(~keep, 0.0)


def merge_dare_linear(base, experts, weights, params: DareParams, rng):
    import torch

    summed = torch.zeros_like(base)
    for w, x in zip(weights, experts):
        summed.add_(drop_and_rescale(x.sub_(base), params.density, rng), alpha=w)
    return summed.mul_(params.lambda_).add_(base)


def merge_dare_ties(base, experts, weights, params: DareParams, rng):
    dropped = (drop_and_rescale(x.sub_(base), params.density, rng) for x in experts)
    return elect_sign_and_merge(dropped, weights, base.shape).mul_(params.lambda_).add_(base)


DARE_LINEAR = MergeMethod(name="dare_linear", params=DareParams, merge=merge_dare_linear,
                          needs_base=True, reference="https://arxiv.org/abs/2311.03099")
DARE_TIES = MergeMethod(name="dare_ties", params=DareParams, merge=merge_dare_ties,
                        needs_base=True, reference="https://arxiv.org/abs/2311.03099")
