"""The results table: one tidy row per (run, method, k, prior, eval domain, split).

``RUN_DIR/results/results.csv`` and ``results.parquet`` hold the same table; both are rewritten
atomically on every append (under a file lock, so parallel eval jobs of one run do not lose each
other's rows). A row whose key (``KEY_COLUMNS``) is already present replaces the old row, so
re-running an evaluation updates the table instead of duplicating it. ``analysis/`` reads only
this table (and ``records/``). pandas only: no torch, no fairseq.

An append validates only the new rows: the existing table was validated when it was written,
so it is only checked to be ours (known columns, the required ones present, our dtypes) before
the new rows join it; anything else gets the full validation, whose errors name the file.
Re-mixing a forest appends a few rows to a table that grows with every setting tried, and
re-validating the whole table each time was most of a re-mix's cost.
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
    naming the row and column at fault.

    The checks run on plain numpy arrays, one column at a time, and the typed table is built
    once at the end: every pandas operation has a fixed cost of tens of microseconds, and
    appending a few rows (a re-mix) should not pay it once per check."""
    columns = _columns(rows)
    if not columns or not len(next(iter(columns.values()))):
        raise BtmError("no result rows to write")
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise BtmError(f"results: unknown column {unknown[0]!r}; known columns: {', '.join(COLUMNS)}")
    for col in REQUIRED_COLUMNS:
        if col not in columns:
            raise BtmError(f"results: missing required column {col!r} ({REQUIRED_COLUMNS[col][1]})")
        missing = pd.isna(columns[col])
        if missing.any():
            raise BtmError(f"results: column {col!r} is empty in row {_first(missing)}")
    values = {col: _typed(columns[col], col, kind) for col, (kind, _) in COLUMNS.items() if col in columns}
    _check_values(values)
    return pd.DataFrame({col: pd.array(v, dtype=_DTYPES[COLUMNS[col][0]]) for col, v in values.items()})


def _columns(rows) -> dict[str, np.ndarray]:
    """{column: object array of its values} (a key missing from a row dict: None)."""
    if isinstance(rows, pd.DataFrame):
        return {c: rows[c].to_numpy(dtype=object, copy=True) for c in rows.columns}
    rows = list(rows)
    out = {}
    for col in dict.fromkeys(k for r in rows for k in r):
        out[col] = np.empty(len(rows), dtype=object)  # filled in place: list values stay items
        out[col][:] = [r.get(col) for r in rows]
    return out


def _typed(values: np.ndarray, col: str, kind: str) -> np.ndarray:
    """The column as an object array of str or None (text) or a float64 array with NaN for
    missing values (numbers; whole numbers checked for ``int``)."""
    if kind == "str":
        for i, v in enumerate(values):
            if isinstance(v, str):
                continue
            if not pd.isna(v):
                raise BtmError(f"results: column {col!r} must be text; row {i} has {v!r}")
            values[i] = None  # values is our own copy (_columns)
        return values
    given = ~pd.isna(values)
    numeric = np.asarray(pd.to_numeric(values, errors="coerce"), dtype="float64")
    bad = np.isnan(numeric) & given
    if bad.any():
        i = _first(bad)
        raise BtmError(f"results: column {col!r} must be a number; row {i} has {values[i]!r}")
    if kind == "int":
        frac = ~np.isnan(numeric) & (numeric != np.round(numeric))
        if frac.any():
            i = _first(frac)
            raise BtmError(f"results: column {col!r} must be a whole number; row {i} has {values[i]!r}")
        return np.round(numeric)
    return numeric


def _first(mask) -> int:
    return int(np.asarray(mask).argmax())


def _check_values(cols: dict[str, np.ndarray]) -> None:
    for i, method in enumerate(cols["method"]):
        if method not in METHODS and not _EXPERT_METHOD.fullmatch(method):
            raise BtmError(f"results: column 'method' row {i} has unknown method {method!r}; "
                           f"use expert:<name> or one of {', '.join(sorted(METHODS))}")
    for col in ("k", "tokens", "expert_forward_passes", "seconds"):
        neg = cols[col] < 0
        if neg.any():
            raise BtmError(f"results: column {col!r} must be >= 0; row {_first(neg)} is negative")
    for col in ("k", "tokens"):
        zero = cols[col] < 1
        if zero.any():
            raise BtmError(f"results: column {col!r} must be >= 1; row {_first(zero)} is 0")
    nll, ppl = cols["nll"], cols["ppl"]
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
        parquet, csv = rdir / "results.parquet", rdir / "results.csv"
        old = _read_own_table(parquet) if parquet.exists() else (
            read_results(csv) if csv.exists() else None)
        # Both parts are validated and typed; the new rows end the table (keep="last").
        table = new if old is None else _typed_columns(pd.concat([old, new], ignore_index=True))
        table = table.drop_duplicates(subset=KEY_COLUMNS, keep="last").reset_index(drop=True)
        # Parquet first: it is what readers and the next append prefer, so a crash between the
        # two renames leaves a stale csv (rewritten by the next append), never lost rows.
        with atomic_path(parquet) as tmp:
            table.to_parquet(tmp, index=False)
        with atomic_path(csv) as tmp:
            table.to_csv(tmp, index=False)
    return table


def _read_own_table(path: Path) -> pd.DataFrame:
    """The existing table at ``path`` (parquet). One that append_results wrote (known columns,
    required ones present, our dtypes) is returned as read: it was validated when written.
    Anything else is validated in full, so a foreign or hand-edited file gets an error naming
    it and the column at fault (or is accepted and typed, if its values are valid)."""
    import pyarrow.parquet as pq

    try:  # one file: ParquetFile skips pd.read_parquet's dataset discovery (a third of the read)
        df = pq.ParquetFile(path).read().to_pandas()
    except (OSError, ValueError) as e:
        raise BtmError(f"could not read results table {path}: {e}") from e
    ours = (set(REQUIRED_COLUMNS) <= set(df.columns) <= set(COLUMNS)
            and all(df[c].dtype == _DTYPES[COLUMNS[c][0]] for c in df.columns))
    if ours:
        return df
    try:
        return validate_rows(df)
    except BtmError as e:
        raise BtmError(f"{path}: {e}") from None


def _typed_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Columns in schema order with our dtypes (a concat of tables with different optional
    columns fills the gaps with missing values that may not keep the dtype)."""
    recast = {c: _DTYPES[COLUMNS[c][0]] for c in df.columns if df[c].dtype != _DTYPES[COLUMNS[c][0]]}
    order = [c for c in COLUMNS if c in df.columns]
    df = df.astype(recast) if recast else df
    return df if list(df.columns) == order else df[order]
