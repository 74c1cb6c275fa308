"""The merge methods by name, and their parameters from a user's ``{key: value}``.

Each method lives in its own module (linear, task_arithmetic, ties, dare, model_stock) and
exposes a ``MergeMethod``; the registry is the list of them. A method is a per-tensor function

    merge(base, experts, weights, params, rng) -> merged float32 tensor

``base``: the base model's tensor (float32) or None for methods that take no base; ``experts``:
the experts' tensors of the same parameter (float32), a sequence the function iterates once,
each element read when it is reached so that only one expert's tensor is in memory at a time,
and each a fresh copy the function may overwrite (work in place: memory is the budget);
``weights``: one positive float per expert, summing to 1; ``params``: the method's parameters
dataclass; ``rng``: a ``torch.Generator`` seeded from the run's seed and the parameter name (only
DARE draws from it). The function must not modify ``base``.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from fairseq_ext.merging import dare, linear, model_stock, task_arithmetic, ties
from fairseq_ext.merging.method import MergeMethod
from launcher.contract.errors import BtmError


METHODS: list[MergeMethod] = [linear.METHOD, task_arithmetic.METHOD, ties.METHOD, dare.DARE_TIES,
                               dare.DARE_LINEAR, model_stock.METHOD]


def _methods() -> dict[str, MergeMethod]:
    return {m.name: m for m in METHODS}


def method_names() -> list[str]:
    return list(_methods())


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; BtmError with a did-you-mean for a typo."""
    methods = _methods()
    if name in methods:
        return methods[name]
    close = difflib.get_close_matches(str(name), list(methods), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise BtmError(f"unknown merge method {name!r}{hint} (known: {', '.join(methods)})")


def make_params(method: MergeMethod, values: Any = None):
    """``method``'s parameters: its defaults, overridden by ``values`` (a dict, or an instance
    of the method's dataclass). Keys are the field names; ``lambda`` is accepted for
    ``lambda_``. Unknown keys and out-of-range values raise BtmError."""
    if isinstance(values, method.params):
        return values
    fields = [f.name for f in dataclasses.fields(method.params)]
    given = {}
    for key, value in dict(values or {}).items():
        field = "lambda_" if key == "lambda" else key
        if field not in fields:
            shown = ["lambda" if f == "lambda_" else f for f in fields]
            close = difflib.get_close_matches(str(key), shown, n=1)
            hint = (f"; did you mean {close[0]!r}?" if close else
                    f"; it takes {', '.join(shown) or 'no parameters'}")
            raise BtmError(f"merge method {method.name!r} has no parameter {key!r}{hint}")
        given[field] = value
    return method.params(**given)
