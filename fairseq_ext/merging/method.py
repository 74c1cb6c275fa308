"""What a merge method is (``MergeMethod``; the per-tensor contract is in registry.py's
docstring) and the parameter checks the methods share."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from launcher.contract.errors import BtmError


@dataclass(frozen=True)
class MergeMethod:
    name: str
    params: type  # a frozen dataclass: defaults, and validation in __post_init__
    merge: Callable  # (base, experts, weights, params, rng) -> torch.Tensor
    needs_base: bool  # works on task vectors (expert - base)
    reference: str  # the paper the rule and its defaults come from


def check_density(method: str, density) -> None:
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise BtmError(f"{method}: density must be in (0, 1] (the fraction of each task vector "
                       f"kept), got {density!r}")


def check_lambda(method: str, lam) -> None:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise BtmError(f"{method}: lambda must be a finite number > 0 (the scale of the merged "
                       f"task vector), got {lam!r}")
