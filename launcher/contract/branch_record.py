"""``branch.json``: how an expert started, written beside its initial checkpoint.

``{"out": "init.pt", "sha256": <of out>, "method": "seed" | "posterior" | "explicit" | "copy",
"parents": [{"path", "sha256", "weight"}], ...}`` plus what the brancher adds (the pipeline:
``parent_names`` {name: weight}; a posterior branch: its domain and top_k). One writer
(``fairseq_ext.branch.branch_expert`` through ``write_branch_record``) and one reader
(``read_branch_record``): the forest's lineage (merge stage) and a merge's base model
(``fairseq_ext.merging.base``) both come from here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from launcher.contract.atomic import atomic_write_json
from launcher.contract.errors import BtmError

BRANCH_FILE = "branch.json"


def branch_record_path(expert_dir: str | os.PathLike) -> Path:
    return Path(expert_dir) / BRANCH_FILE


def write_branch_record(expert_dir: str | os.PathLike, record: dict) -> None:
    atomic_write_json(branch_record_path(expert_dir), record)


def read_branch_record(expert_dir: str | os.PathLike) -> dict | None:
    """The expert's branch record; None when it has none (trained from random init, or not
    branched by btm); BtmError naming the file when it exists but is not a readable record."""
    path = branch_record_path(expert_dir)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BtmError(f"{path}: not a readable branch record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("parents"), list) or "out" not in record:
        raise BtmError(f"{path}: not a btm branch record (needs 'out' and a 'parents' list)")
    return record
