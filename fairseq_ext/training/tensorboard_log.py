"""TensorBoard event files of one training run, for users who watch their runs in TensorBoard.

Off by default; ``TrainSpec.tensorboard`` turns it on (config key ``training.tensorboard``,
``btm seed/train --tensorboard``). Rank 0 then writes each ``train_log.jsonl`` row's scalars
again as events in ``SAVE_DIR/tensorboard/``, x axis = the update:

- a log row: ``train/loss`` (nats per target token), ``train/lr``, ``train/tokens_per_s``,
  ``train/tokens`` (training tokens seen, all ranks);
- a validation row: ``valid/loss`` (mean over the run's domains, the one that picks
  checkpoint_best), ``valid/ppl`` (its exp), ``valid/<domain>/loss``.

``train_log.jsonl`` stays the record btm reads (``btm report`` plots it); the events are a view
of the same rows. A fresh start deletes old event files (as ``TrainLog.clear`` empties the old
rows); a resumed run adds a new event file with ``purge_step`` = the first update it logs, so
TensorBoard drops the events of the work lost since checkpoint_last and a requeued job draws
no zigzag. ``tensorboard`` is imported only when the switch is on.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

from launcher.contract.errors import BtmError


def check_tensorboard_installed() -> None:
    """Refuse the switch before training starts when its package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise BtmError("training.tensorboard is true (btm seed/train --tensorboard) but the "
                       "tensorboard package is not installed: pip install tensorboard")


class TensorBoardLog:
    """Mirrors train_log rows into event files under ``log_dir``; opens its event file at the
    first row, so a no-op re-run of a finished run adds none."""

    def __init__(self, log_dir: Path, tokens_per_update: int, resumed_update: int | None):
        # The package was checked on every rank before training (setup.resolve_spec).
        if resumed_update is None and log_dir.exists():
            shutil.rmtree(log_dir)  # a run started from scratch: those events describe lost work
        self.log_dir = log_dir
        self.tokens_per_update = tokens_per_update
        # Events from this update on (left by work after checkpoint_last) are dropped by readers.
        self.purge_step = None if resumed_update is None else resumed_update + 1
        self.writer = None

    def add_row(self, row: dict) -> None:
        scalars = self._scalars(row)
        if not scalars:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, row["update"])
        self.writer.flush()  # what a kill leaves matches train_log.jsonl, row for row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _scalars(self, row: dict) -> dict[str, float]:
        scalars = {}
        if "loss" in row:
            scalars.update({"train/loss": row["loss"], "train/lr": row["lr"],
                            "train/tokens_per_s": row["tokens_per_s"],
                            "train/tokens": row["update"] * self.tokens_per_update})
        if "valid_loss" in row:
            scalars.update({"valid/loss": row["valid_loss"], "valid/ppl": _perplexity(row["valid_loss"])})
            scalars.update({f"valid/{domain}/loss": loss for domain, loss in row["valid"].items()})
        return scalars


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:  # a diverged run: its loss is shown, its perplexity off the chart
        return math.inf
