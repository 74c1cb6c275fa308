"""The files of one training run's save dir: its two checkpoints and ``train_log.jsonl``.

The launcher hands the trainer a save dir; the file names inside it are decided here only.
``train_log.jsonl`` holds one JSON row per log interval (``update, loss, lr, tokens_per_s``),
per validation (``update, valid_loss, valid``) and per save forced by a stop signal
(``update, preempted_save``). Rank 0 alone writes these files, and with
``TrainSpec.tensorboard`` the same scalars as TensorBoard events in ``tensorboard/``
(``tensorboard_log.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from launcher.contract.atomic import atomic_write_text
from launcher.contract.train_log import TRAIN_LOG, read_train_log  # noqa: F401  (the one reader)


@dataclass(frozen=True)
class TrainFiles:
    save_dir: Path

    @property
    def last(self) -> Path:
        """Model, optimizer and everything resume needs; rewritten at every save point."""
        return self.save_dir / "checkpoint_last.pt"

    @property
    def best(self) -> Path:
        """The weights with the lowest mean validation loss so far (no optimizer state)."""
        return self.save_dir / "checkpoint_best.pt"

    @property
    def log(self) -> Path:
        return self.save_dir / TRAIN_LOG

    @property
    def tensorboard(self) -> Path:
        """The event files of ``TrainSpec.tensorboard`` (``tensorboard --logdir`` reads them)."""
        return self.save_dir / "tensorboard"

    def remove_killed_saves(self) -> None:
        """Delete the temporary files of saves that were killed midway (rank 0 only: another
        rank could delete a save in progress)."""
        for stale in self.save_dir.glob(".checkpoint_*.pt.*.tmp"):
            stale.unlink(missing_ok=True)


class TrainLog:
    """Appends rows to ``train_log.jsonl``, and to ``board`` (a ``TensorBoardLog``) when given;
    on ranks other than 0 (``writes=False``) it writes nothing."""

    def __init__(self, path: Path, writes: bool = True, board=None):
        self.path = path
        self.writes = writes
        self.board = board

    def append(self, row: dict) -> None:
        if self.writes:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.board is not None:
            self.board.add_row(row)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def truncate_after(self, update: int) -> None:
        """Drop rows past the resumed update (they belong to work that was lost)."""
        if self.writes and self.path.exists():
            kept = [row for row in read_train_log(self.path.parent) if row.get("update", 0) <= update]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def clear(self) -> None:
        """A run that starts from scratch (no checkpoint_last, e.g. a deleted one retrained):
        the old rows describe work that is gone, so they go too instead of being duplicated."""
        if self.writes and self.path.exists():
            atomic_write_text(self.path, "")
