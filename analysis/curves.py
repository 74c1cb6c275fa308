"""Learning curves: validation loss against updates and training tokens for every model of a
run (the seed, each expert, the dense baseline), from each save dir's ``train_log.jsonl``
(read by ``launcher.contract.train_log``, the one reader) and the job records.

Tokens per update come from the model's stage record (``train: {num_updates, tokens}``:
records/seed.json, records/dense.json, records/train.<expert>.json). An expert's axis counts
its own training (updates after branching), not the seed's before it.
"""
from __future__ import annotations

import pandas as pd

from analysis.results import RunData
from launcher.contract.layout import DENSE, SEED, RunLayout
from launcher.contract.train_log import read_train_log

CURVE_COLUMNS = ["model", "kind", "update", "tokens", "valid_loss"]


def _tokens_per_update(run: RunData, stage: str, unit: str) -> float | None:
    for rec in run.records:
        train = rec.get("train")
        if rec["stage"] == stage and rec["unit"] == unit and train and train.get("num_updates"):
            return float(train["tokens"]) / float(train["num_updates"])
    return None


def _models(run: RunData) -> list[tuple[str, str, str, str]]:
    """(model, kind, record stage, record unit) of every save dir in the run, seed first."""
    layout = RunLayout(run.path)
    experts_dir = layout.root / "experts"
    experts = sorted(p.name for p in experts_dir.iterdir() if p.is_dir()) if experts_dir.is_dir() else []
    return ([(SEED, "seed", "seed", "")] + [(e, "expert", "train", e) for e in experts]
            + [(DENSE, "dense", "dense", "")])


def learning_curves(run: RunData) -> pd.DataFrame:
    """One row per validation of every model (columns ``CURVE_COLUMNS``; ``tokens`` NaN when
    the model has no record to say its tokens per update)."""
    layout = RunLayout(run.path)
    rows = []
    for model, kind, stage, unit in _models(run):
        per_update = _tokens_per_update(run, stage, unit)
        for row in read_train_log(layout.model_dir(model)):
            if "valid_loss" not in row or row.get("valid_loss") is None:
                continue
            update = int(row["update"])
            rows.append({"model": model, "kind": kind, "update": update,
                         "tokens": update * per_update if per_update is not None else float("nan"),
                         "valid_loss": float(row["valid_loss"])})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)
