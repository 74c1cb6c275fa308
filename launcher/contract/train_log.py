"""The one reader of a training run's ``train_log.jsonl`` (no torch: the report reads it too).

The trainer (fairseq_ext/training/save_dir.py, ``TrainLog``) appends one JSON row per log
interval (``update, loss, lr, tokens_per_s``), per validation (``update, valid_loss, valid``:
the mean and the per-domain validation losses) and per save forced by a stop signal
(``update, preempted_save``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


TRAIN_LOG = "train_log.jsonl"


def read_train_log(save_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``SAVE_DIR/train_log.jsonl`` in order ([] when there is none). A line that is
    not a JSON object (an append cut by a kill) is skipped with a warning naming the file and
    line: it holds no complete row, and refusing it would leave the run unable to resume."""
    path = Path(save_dir) / TRAIN_LOG
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            print(f"btm: warning: {path}:{number} is not a JSON row; skipping it", file=sys.stderr)
    return rows
