"""The base model task-vector methods subtract: the experts' recorded parent, or one given.

An expert trained by btm has ``branch.json`` beside its checkpoint (fairseq_ext.branch): the
parents its initial checkpoint ``out`` (sha256 ``sha256``) was averaged from. With one parent
(the seed LM) that parent is the base; with several (a posterior-weighted branch) the base is
the averaged initial checkpoint itself. Experts merged around one base must share the record.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from launcher.contract.branch_record import branch_record_path, read_branch_record
from launcher.contract.errors import BtmError


def recorded_parent(expert_path) -> dict | None:
    """``{"path", "sha256", "accepts", "record"}`` from the expert's branch.json, or None when
    it has none. ``accepts``: the hashes that count as this parent (the seed's file and the
    initial checkpoint, which is the seed's copy when there is one parent)."""
    expert_dir = Path(expert_path).parent
    record = read_branch_record(expert_dir)
    if record is None:
        return None
    record_path = branch_record_path(expert_dir)
    try:
        parents = record["parents"]
        init = {"path": str(expert_dir / record["out"]), "sha256": record["sha256"]}
    except (KeyError, TypeError) as e:
        raise BtmError(f"{record_path}: not a readable branch record ({type(e).__name__}: {e})") from None
    if len(parents) == 1:
        chosen = {"path": parents[0]["path"], "sha256": parents[0]["sha256"]}
    else:
        chosen = init
    return {**chosen, "accepts": {chosen["sha256"], init["sha256"]}, "record": str(record_path),
            "lineage": [(p["sha256"], p["weight"]) for p in parents]}


def resolve_base(expert_paths, base=None) -> str:
    """The base checkpoint's path: ``base`` if given (a warning when it is not the experts'
    recorded parent, naming that parent), else the parent the experts' branch.json records."""
    from fairseq_ext.checkpoint import verify_checkpoint

    records = {str(p): recorded_parent(p) for p in expert_paths}
    if base is not None:
        sha = verify_checkpoint(base)
        for expert, rec in records.items():
            if rec is not None and sha not in rec["accepts"]:
                warnings.warn(f"base {base} is not the recorded parent of expert {expert}: its "
                              f"{rec['record']} names {rec['path']} (sha256 {rec['sha256'][:12]}...); "
                              "task vectors are measured from the base you gave", stacklevel=3)
                break
        return str(base)
    missing = [p for p, rec in records.items() if rec is None]
    if missing:
        raise BtmError(f"no base model: {missing[0]} has no branch.json beside it to name its "
                       "parent; give the base checkpoint explicitly")
    (first, rec), *others = records.items()
    for expert, other in others:
        if other["lineage"] != rec["lineage"]:
            raise BtmError(f"experts {first} and {expert} branched from different parents "
                           f"({rec['path']} vs {other['path']}, see {rec['record']} and "
                           f"{other['record']}): give the base checkpoint explicitly")
    if not Path(rec["path"]).is_file():
        raise BtmError(f"the recorded parent of {first}, {rec['path']} (in {rec['record']}), "
                       "does not exist; give the base checkpoint explicitly")
    if verify_checkpoint(rec["path"]) != rec["sha256"]:
        raise BtmError(f"the recorded parent of {first}, {rec['path']}, changed since the expert "
                       f"branched from it (sha256 recorded in {rec['record']}); give the base "
                       "checkpoint explicitly")
    return rec["path"]
