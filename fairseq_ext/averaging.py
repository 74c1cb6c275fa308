"""Weighted parameter averaging of expert checkpoints: the linear merge method.

``average_checkpoints`` is ``fairseq_ext.merging.merge_checkpoints(method="linear")``: streamed
parameter by parameter over memory-mapped checkpoints, so averaging N experts needs the output
model plus a few tensors of the largest parameter's size, whatever N is
(benchmarks/average_memory.py, docs/benchmarks.md).

Arithmetic (exact and reproducible): weights are validated, normalized in float64, rounded to
float32, and the sum is ``acc = acc + w_i * float32(x_i)`` in the order the paths are given,
starting from zeros; the result is cast back to each tensor's original dtype.

Before adding anything, every checkpoint is checked against the first: same architecture
settings, same dictionary, same parameter names and shapes. The first mismatch raises BtmError
naming both checkpoints and the differing key or setting. This module is also where that check
(``check_compatible``), weight validation (``normalize_weights``) and the safetensors writer
live for every merge method.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from launcher.contract.errors import BtmError

# Model cfg settings that change the parameters' meaning (not just training behaviour).
_ARCH_KEY = re.compile(r"^_name$|layers|embed_dim|heads|ffn|positions|share_|tie_|activation_fn|normalize_before")


def normalize_weights(weights, paths) -> list[float]:
    """Validated weights normalized to sum 1 (float64), one per path."""
    weights = [float(w) for w in weights]
    if len(weights) != len(paths):
        raise BtmError(f"{len(weights)} weights given for {len(paths)} checkpoints")
    if not paths:
        raise BtmError("no checkpoints to average")
    for p, w in zip(paths, weights):
        if not math.isfinite(w):
            raise BtmError(f"weight of {p} is {w}: weights must be finite numbers")
        if w < 0:
            raise BtmError(f"weight of {p} is negative ({w}): weights must be >= 0")
    total = math.fsum(weights)
    if total <= 0:
        raise BtmError(f"all weights are zero ({weights}): at least one must be positive")
    return [w / total for w in weights]


def _arch(cfg_model: dict) -> dict:
    return {k: v for k, v in sorted(cfg_model.items()) if _ARCH_KEY.search(k)}


def _describe(path, state) -> dict:
    from fairseq_ext.checkpoint import btm_state

    cfg = state.get("cfg") or {}
    if "model" not in state or not cfg.get("model"):
        raise BtmError(f"{path} is not a model checkpoint (no 'model' weights or 'cfg.model')")
    d = btm_state(state).get("dictionary")
    return {
        "arch": _arch(cfg["model"]),
        "dictionary": list(d["symbols"]) if d else None,
        "shapes": {k: (tuple(v.shape), v.dtype) for k, v in state["model"].items()},
    }


def check_compatible(paths, *, trust_pickle: bool = False) -> dict:
    """Raise BtmError at the first difference between ``paths[0]`` and another checkpoint."""
    from fairseq_ext.checkpoint import load_checkpoint

    ref = None
    for p in paths:
        state = load_checkpoint(p, trust_pickle=trust_pickle, mmap=True)
        desc = _describe(p, state)
        del state
        if ref is None:
            ref, ref_path = desc, p
            continue
        for k in sorted(set(ref["arch"]) | set(desc["arch"])):
            if ref["arch"].get(k) != desc["arch"].get(k):
                raise BtmError(f"cannot average {ref_path} and {p}: different architecture, "
                               f"setting {k!r} is {ref['arch'].get(k)!r} vs {desc['arch'].get(k)!r}")
        if ref["dictionary"] is not None and desc["dictionary"] is not None \
                and ref["dictionary"] != desc["dictionary"]:
            a, b = ref["dictionary"], desc["dictionary"]
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise BtmError(f"cannot average {ref_path} and {p}: different dictionaries "
                           f"({len(a)} vs {len(b)} symbols; first difference at index {i})")
        for k in sorted(set(ref["shapes"]) | set(desc["shapes"])):
            if k not in desc["shapes"] or k not in ref["shapes"]:
                where = p if k not in desc["shapes"] else ref_path
                raise BtmError(f"cannot average {ref_path} and {p}: parameter {k!r} is missing "
                               f"from {where}")
            if ref["shapes"][k][0] != desc["shapes"][k][0]:
                raise BtmError(f"cannot average {ref_path} and {p}: parameter {k!r} has shape "
                               f"{list(ref['shapes'][k][0])} vs {list(desc['shapes'][k][0])}")
    return ref


def average_checkpoints(paths, weights, out_path, *, safetensors_path=None,
                        btm_extra: dict | None = None, trust_pickle: bool = False) -> dict:
    """Write the weighted average of ``paths`` to ``out_path`` (fairseq checkpoint, update 0).

    ``trust_pickle`` (the CLI's ``--trust-checkpoint``) lets parents that need pickle load; the
    output is always a weights_only checkpoint, so this is also how a trusted legacy checkpoint
    is converted (``btm branch --from OLD --out NEW --trust-checkpoint``).

    Returns ``{"out": path, "sha256": ..., "weights": [normalized], "parents": [...]}``.
    """
    from fairseq_ext.merging import merge_checkpoints

    result = merge_checkpoints(paths, weights, out_path, method="linear",
                               safetensors_path=safetensors_path, btm_extra=btm_extra,
                               trust_pickle=trust_pickle)
    return {k: result[k] for k in ("out", "sha256", "weights", "parents")}


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Atomic safetensors file; the tied output embedding stays one tensor."""
    from safetensors.torch import save_file

    from launcher.contract.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
