"""Weighted parameter averaging of expert checkpoints, streamed one checkpoint at a time.

Memory: the fp32 running sum (one model) plus the one checkpoint being read, which is
memory-mapped (``torch.load(mmap=True, weights_only=True)``) so only the tensor being added is
paged in and the pages are dropped when the checkpoint is closed. Averaging N experts therefore
needs about two experts' worth of memory whatever N is (benchmarks/average_memory.py).

Arithmetic (exact and reproducible): weights are validated, normalized in float64, rounded to
float32, and the sum is ``acc = acc + w_i * float32(x_i)`` in the order the paths are given,
starting from zeros; the result is cast back to each tensor's original dtype.

Before adding anything, every checkpoint is checked against the first: same architecture
settings, same dictionary, same parameter names and shapes. The first mismatch raises BtmError
naming both checkpoints and the differing key or setting.
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
    import torch

    from fairseq_ext import checkpoint as ck

    paths = [str(p) for p in paths]
    for p in paths:
        if not os.path.isfile(p):
            raise BtmError(f"checkpoint not found: {p}")
    norm = normalize_weights(weights, paths)
    ref = check_compatible(paths, trust_pickle=trust_pickle)

    acc = {k: torch.zeros(shape, dtype=torch.float32) for k, (shape, _) in ref["shapes"].items()}
    parents = []
    cfg = dictionary = None
    for p, w in zip(paths, norm):
        sha = ck.verify_checkpoint(p)
        parents.append({"path": p, "sha256": sha, "weight": w})
        if w == 0.0:
            continue
        state = ck.load_checkpoint(p, trust_pickle=trust_pickle, mmap=True, verify=False)
        if cfg is None:
            cfg, dictionary = state["cfg"], ck.checkpoint_dictionary(state, p)
        w32 = torch.tensor(w, dtype=torch.float32)
        for k in list(state["model"]):
            # acc + (w * x): the product is rounded to fp32 before the add, as written.
            acc[k].add_(w32 * state["model"].pop(k).to(torch.float32))
        del state  # unmaps the file: its pages leave this process's memory

    out_state = {}
    for k, (shape, dtype) in ref["shapes"].items():
        t = acc.pop(k).to(dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BtmError(f"averaged parameter {k!r} has NaN/inf values (check the parents: "
                           f"{', '.join(paths)})")
        out_state[k] = t
    if set(out_state) != set(ref["shapes"]):
        raise BtmError("internal error: averaged keys differ from the parents'")
    btm = {"averaged_from": parents}
    btm.update(btm_extra or {})
    state = ck.make_state(out_state, cfg, dictionary, num_updates=0, btm=btm)
    sha = ck.save_checkpoint(state, out_path)
    if safetensors_path is not None:
        save_safetensors(out_state, safetensors_path, {"source_sha256": sha})
    return {"out": str(out_path), "sha256": sha, "weights": norm, "parents": parents}


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Atomic safetensors file; the tied output embedding stays one tensor."""
    from safetensors.torch import save_file

    from launcher.contract.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
