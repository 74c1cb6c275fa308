"""The results table: one tidy row per (run, method, k, prior, eval domain, split).

``RUN_DIR/results/results.csv`` and ``results.parquet`` hold the same table; both are rewritten
atomically on every append (under a file lock, so parallel eval jobs of one run do not lose each
other's rows). A row whose key (``KEY_COLUMNS``) is already present replaces the old row, so
re-running an evaluation updates the table instead of duplicating it. ``analysis/`` reads only
this table (and ``records/``). pandas only: no torch, no fairseq.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from launcher.atomic import atomic_path
from launcher.errors import BtmError

# column -> (kind, help). Kinds: str, int, float.
REQUIRED_COLUMNS: dict[str, tuple[str, str]] = {
    "run": ("str", "run name (the run directory's name unless given)"),
    "method": ("str", "expert:<name>, dense, ensemble_*, topk_prior, average_*, random_split, cbtm_cluster"),
    "k": ("int", "number of experts whose scores the method used (1 for a single model)"),
    "prior": ("str", "prior settings, e.g. 'ewma(alpha=0.3,batches=all,batch_docs=2,split=valid)'; 'none' if none"),
    "eval_domain": ("str", "domain of the evaluation data"),
    "split": ("str", "valid or test"),
    "tokens": ("int", "number of target tokens scored"),
    "nll": ("float", "mean natural-log loss per token"),
    "ppl": ("float", "exp(nll)"),
    "expert_forward_passes": ("int", "forward passes actually run for this row (0 on a cache hit)"),
    "seconds": ("float", "wall-clock seconds this row cost (scoring done now + mixing)"),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, str]] = {
    "seed_fraction": ("float", "fraction of the compute budget spent on the seed LM"),
    "n_clusters": ("int", "c-BTM: number of clusters"),
    "routing": ("str", "c-BTM: routing settings"),
    "notes": ("str", "free text"),
}
COLUMNS = {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}
KEY_COLUMNS = ["run", "method", "k", "prior", "eval_domain", "split"]

METHODS = {"dense", "ensemble_uniform", "ensemble_prior", "ensemble_posterior", "ensemble_prev_token",
           "topk_prior", "average_uniform", "average_argmax", "average_posterior", "random_split",
           "cbtm_cluster"}
_EXPERT_METHOD = re.compile(r"expert:[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

_DTYPES = {"str": "string", "int": "Int64", "float": "float64"}


def results_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "results"


def validate_rows(rows) -> pd.DataFrame:
    """Rows (list of dicts or a DataFrame) as a typed DataFrame in column order, or BtmError
    naming the row and column at fault."""
    df = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows.copy()
    if df.empty:
        raise BtmError("no result rows to write")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        raise BtmError(f"results: unknown column {unknown[0]!r}; known columns: {', '.join(COLUMNS)}")
    for col in REQUIRED_COLUMNS:
        if col not in df.columns:
            raise BtmError(f"results: missing required column {col!r} ({REQUIRED_COLUMNS[col][1]})")
        missing = df[col].isna()
        if missing.any():
            raise BtmError(f"results: column {col!r} is empty in row {_first(missing)}")
    out = pd.DataFrame(index=df.index)
    for col in COLUMNS:
        if col not in df.columns:
            continue
        kind = COLUMNS[col][0]
        out[col] = _typed(df[col], col, kind)
    _check_values(out)
    return out.reset_index(drop=True)


def _typed(series: pd.Series, col: str, kind: str) -> pd.Series:
    if kind == "str":
        bad = series.map(lambda v: not (isinstance(v, str) or pd.isna(v)), na_action=None)
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise BtmError(f"results: column {col!r} must be text; row {i} has {series.iloc[i]!r}")
        return series.astype("string")
    numeric = pd.to_numeric(series, errors="coerce")
    bad = numeric.isna() & series.notna()
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise BtmError(f"results: column {col!r} must be a number; row {i} has {series.iloc[i]!r}")
    if kind == "int":
        frac = numeric.notna() & (numeric != numeric.round())
        if frac.any():
            i = int(frac.to_numpy().argmax())
            raise BtmError(f"results: column {col!r} must be a whole number; row {i} has {series.iloc[i]!r}")
        return numeric.round().astype("Int64")
    return numeric.astype("float64")


def _first(mask) -> int:
    return int(np.asarray(mask).argmax())


def _check_values(df: pd.DataFrame) -> None:
    methods = df["method"].astype(str)
    bad = ~(methods.isin(METHODS) | methods.str.fullmatch(_EXPERT_METHOD.pattern))
    if bad.any():
        i = _first(bad)
        raise BtmError(f"results: column 'method' row {i} has unknown method {methods.iloc[i]!r}; "
                       f"use expert:<name> or one of {', '.join(sorted(METHODS))}")
    for col in ("k", "tokens", "expert_forward_passes", "seconds"):
        neg = (df[col] < 0).to_numpy(dtype=bool)
        if neg.any():
            raise BtmError(f"results: column {col!r} must be >= 0; row {_first(neg)} is negative")
    for col in ("k", "tokens"):
        zero = (df[col] < 1).to_numpy(dtype=bool)
        if zero.any():
            raise BtmError(f"results: column {col!r} must be >= 1; row {_first(zero)} is 0")
    nll, ppl = df["nll"].to_numpy(), df["ppl"].to_numpy()
    bad = ~np.isfinite(nll) | (nll < 0)
    if bad.any():
        i = _first(bad)
        raise BtmError(f"results: column 'nll' row {i} must be a finite non-negative loss, got {nll[i]}")
    with np.errstate(over="ignore"):
        bad = ~np.isclose(ppl, np.exp(nll), rtol=1e-6, atol=0)
    if bad.any():
        i = _first(bad)
        raise BtmError(f"results: column 'ppl' row {i} is {ppl[i]} but exp(nll) = {math.exp(nll[i])}")


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """The results table from a run dir, its results/ dir, or a results.csv/.parquet file."""
    path = Path(path)
    if path.is_dir():
        rdir = path if path.name == "results" and not (path / "results").is_dir() else results_dir(path)
        parquet, csv = rdir / "results.parquet", rdir / "results.csv"
        path = parquet if parquet.exists() else csv
    if not path.exists():
        raise BtmError(f"no results table at {path}")
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix == ".csv":
            df = pd.read_csv(path, keep_default_na=False, na_values=[""],
                             dtype={c: "string" for c, (k, _) in COLUMNS.items() if k == "str"})
        else:
            raise BtmError(f"{path}: results table must be .csv or .parquet")
    except (OSError, ValueError) as e:
        raise BtmError(f"could not read results table {path}: {e}") from e
    try:
        return validate_rows(df)
    except BtmError as e:
        raise BtmError(f"{path}: {e}") from None


def append_results(run_dir: str | os.PathLike, rows) -> pd.DataFrame:
    """Add rows to RUN_DIR/results/results.{csv,parquet}; a row with an existing key replaces
    the old one. Both files are rewritten atomically. Returns the whole table, whose last
    ``len(rows)`` rows are the new ones (when the new rows have distinct keys)."""
    from filelock import FileLock

    new = validate_rows(rows)
    rdir = results_dir(run_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(rdir / ".results.lock")):
        parquet = rdir / "results.parquet"
        old = read_results(parquet) if parquet.exists() else (
            read_results(rdir / "results.csv") if (rdir / "results.csv").exists() else None)
        # Both parts are validated and typed; the new rows end the table (keep="last").
        table = new if old is None else pd.concat([old, new], ignore_index=True)
        table = table.drop_duplicates(subset=KEY_COLUMNS, keep="last").reset_index(drop=True)
        with atomic_path(rdir / "results.csv") as tmp:
            table.to_csv(tmp, index=False)
        with atomic_path(parquet) as tmp:
            table.to_parquet(tmp, index=False)
    return table
