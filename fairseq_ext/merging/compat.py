"""What makes checkpoints mergeable, checked before any tensor is read: the same architecture
settings, dictionary, parameter names and shapes (the first mismatch raises BtmError naming both
checkpoints and the differing key or setting); weights validated and normalized; and the
safetensors copy every merged model gets."""
from __future__ import annotations

import math
import re
from pathlib import Path

from launcher.contract.errors import BtmError

# Model cfg settings that change the parameters' meaning (not just training behaviour).
_ARCH_KEY = re.compile(r"^_name$|layers|embed_dim|heads|ffn|positions|share_|tie_|activation_fn|normalize_before"
                       r"|rope_|norm_eps")


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


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Atomic safetensors file; the tied output embedding stays one tensor."""
    from safetensors.torch import save_file

    from launcher.contract.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
