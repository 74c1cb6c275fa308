"""Merge expert checkpoints into one fairseq checkpoint, streamed parameter by parameter.

For each parameter name, the method's per-tensor function reads the experts' tensors one after
another from memory-mapped checkpoints (``MappedCheckpoint``: each tensor's pages are given
back once it is copied out) and returns the merged tensor, which is cast to the parameter's
dtype and kept for the output. Memory is therefore the output model (one expert) plus a few
tensors of the size of the largest parameter (the method's accumulators, the base's tensor and
the one expert tensor being read), whatever the number of experts: benchmarks/average_memory.py
measures it (docs/benchmarks.md).

Before merging, every checkpoint (and the base) is checked against the first expert: same
architecture, dictionary, parameter names and shapes (``fairseq_ext.merging.compat.check_compatible``).
Afterwards every merged tensor is checked: same shape as the experts', finite values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

from fairseq_ext.merging.registry import get_method, make_params
from launcher.contract.errors import BtmError


def tensor_generator(seed: int, key: str):
    """A torch.Generator seeded from the run's seed and the parameter's name, so a parameter's
    random draws do not depend on which other parameters there are or their order."""
    import torch

    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def merge_checkpoints(paths, weights, out_path, *, method: str = "linear", params=None,
                      base=None, seed: int = 0, safetensors_path=None,
                      btm_extra: dict | None = None, trust_pickle: bool = False) -> dict:
    """Write the merge of the expert checkpoints ``paths`` to ``out_path`` (update 0).

    ``weights``: one per expert, >= 0, not all 0 (normalized to sum 1; an expert of weight 0
    takes no part). ``method``: a registered name (``method_names()``); ``params``: a dict of
    its parameters (or its dataclass), defaults for the rest. ``base``: the base checkpoint for
    methods that need one; None reads it from the experts' branch.json. ``seed``: for DARE's
    random drop. ``safetensors_path``: also write the weights there.

    Returns ``{"out", "sha256", "weights" (normalized), "parents" [{"path", "sha256",
    "weight"}], "method", "params", "base" (path or None)}``.
    """
    from fairseq_ext import checkpoint as ck
    from fairseq_ext.merging.compat import check_compatible, normalize_weights, save_safetensors
    from fairseq_ext.merging.base import resolve_base
    from fairseq_ext.merging.mapped import (ExpertTensors, MappedCheckpoint,
                                            keep_large_blocks_in_their_own_mappings)

    rule = get_method(method)
    settings = make_params(rule, params)
    paths = [str(p) for p in paths]
    for p in paths:
        if not os.path.isfile(p):
            raise BtmError(f"checkpoint not found: {p}")
    norm = normalize_weights(weights, paths)
    if rule.needs_base:
        base = resolve_base(paths, base)
    elif base is not None:
        raise BtmError(f"merge method {rule.name!r} takes no base model (got {base})")
    ref = check_compatible(paths + ([base] if base else []), trust_pickle=trust_pickle)

    keep_large_blocks_in_their_own_mappings()
    parents = [{"path": p, "sha256": ck.verify_checkpoint(p), "weight": w}
               for p, w in zip(paths, norm)]
    used = [(p, w) for p, w in zip(paths, norm) if w > 0]
    first = ck.load_checkpoint(used[0][0], trust_pickle=trust_pickle, mmap=True, verify=False)
    cfg, dictionary = first["cfg"], ck.checkpoint_dictionary(first, used[0][0])
    del first
    experts = [MappedCheckpoint(p, trust_pickle=trust_pickle) for p, _ in used]
    base_ckpt = MappedCheckpoint(base, trust_pickle=trust_pickle) if base else None
    merged = {}
    for key, (shape, dtype) in ref["shapes"].items():
        base_tensor = base_ckpt.read(key) if base_ckpt else None
        out = rule.merge(base_tensor, ExpertTensors(experts, key), [w for _, w in used],
                         settings, tensor_generator(seed, key))
        del base_tensor
        merged[key] = _checked(out, key, shape, dtype, rule.name, paths)
    del experts, base_ckpt  # unmaps the files

    info = {"method": rule.name, "params": dataclasses.asdict(settings), "seed": int(seed),
            "base": ({"path": str(base), "sha256": ck.verify_checkpoint(base)} if base else None)}
    btm = {"averaged_from": parents, "merge": info}
    btm.update(btm_extra or {})
    sha = ck.save_checkpoint(ck.make_state(merged, cfg, dictionary, num_updates=0, btm=btm),
                             out_path)
    if safetensors_path is not None:
        save_safetensors(merged, safetensors_path, {"source_sha256": sha})
    return {"out": str(out_path), "sha256": sha, "weights": norm, "parents": parents,
            "method": rule.name, "params": info["params"], "base": str(base) if base else None}


def _checked(tensor, key, shape, dtype, method, paths):
    import torch

    if tuple(tensor.shape) != tuple(shape):
        raise BtmError(f"internal error: {method} merged {key!r} to shape {list(tensor.shape)}, "
                       f"the experts' is {list(shape)}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BtmError(f"merged parameter {key!r} has NaN/inf values ({method}; check the "
                       f"experts: {', '.join(paths)})")
    return tensor.to(dtype)
