"""Branch a new expert: its initial checkpoint is a weighted average of parent checkpoints.

``branch_expert({seed: 1.0}, out)`` copies the seed LM (BTM's first iteration); several parents
with weights give the paper's later iterations (weights from the domain posterior, see
``fairseq_ext.priors.branch_weights``). The output is a fresh checkpoint: parameters only, no
optimizer state, update 0, so ``train_lm(TrainSpec(init=out, ...))`` starts a new schedule.
``branch.json`` next to it records the parents (path, sha256, normalized weight). Re-running
with the same parents (same files by sha256, same weights) leaves a finished branch alone.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from launcher.contract.branch_record import read_branch_record, write_branch_record
from launcher.contract.errors import BtmError


def branch_expert(parents: dict | str | os.PathLike, out_path, *, method: str = "explicit",
                  info: dict | None = None, trust_pickle: bool = False) -> dict:
    """Write ``out_path`` (+ ``branch.json`` in its directory); return the branch record."""
    from fairseq_ext.averaging import average_checkpoints
    from fairseq_ext.merging.compat import normalize_weights
    from fairseq_ext.checkpoint import verify_checkpoint

    if isinstance(parents, (str, os.PathLike)):
        parents = {str(parents): 1.0}
    if not parents:
        raise BtmError("branch needs at least one parent checkpoint")
    paths = [str(p) for p in parents]
    weights = normalize_weights(list(parents.values()), paths)
    out_path = Path(out_path)
    wanted = [{"path": p, "sha256": verify_checkpoint(p), "weight": w} for p, w in zip(paths, weights)]
    if out_path.exists():
        try:
            old = read_branch_record(out_path.parent) or {}
        except BtmError as e:  # a derived file: branching again rewrites it
            warnings.warn(f"{e}; branching {out_path} again")
            old = {}
        if old.get("parents") == wanted and old.get("sha256") == verify_checkpoint(out_path):
            return old
    result = average_checkpoints(paths, weights, out_path,
                                 btm_extra={"branch": {"method": method, **(info or {})}},
                                 trust_pickle=trust_pickle)
    record = {"out": out_path.name, "sha256": result["sha256"], "method": method,
              "parents": result["parents"], **(info or {})}
    write_branch_record(out_path.parent, record)
    return record


def posterior_parents(experts: list[str], data_dir: str, domain: str, *, top_k: int | None,
                      split: str = "valid", sample_docs: int = 100) -> dict[str, float]:
    """Parent weights from the new domain's posterior over the existing experts."""
    try:
        from fairseq_ext.priors import branch_weights
    except ImportError as e:
        raise BtmError("--posterior needs fairseq_ext.priors.branch_weights, which this checkout "
                       f"does not have yet ({e}); give --parents a.pt=w,b.pt=w instead") from None
    weights = branch_weights(experts, data_dir, domain, split, sample_docs, top_k)
    if isinstance(weights, dict):
        weights = {str(k): float(v) for k, v in weights.items()}
    else:
        weights = {str(p): float(w) for p, w in zip(experts, list(weights))}
    return {p: w for p, w in weights.items() if w > 0}
