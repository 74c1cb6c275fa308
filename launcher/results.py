"""The results tables: tidy rows, one per evaluated (run, method, variant, data).

``RUN_DIR/results/results.{csv,parquet}`` (``RESULTS``): perplexity, one row per (run, method,
k, prior, eval domain, split). ``RUN_DIR/results/fewshot.{csv,parquet}`` (``FEWSHOT``): few-shot
harness results (lm-evaluation-harness through the ``btm`` model), one row per (run, task,
metric, filter, method, k, routing, prior, num_fewshot, seed). The two share the meaning of
``run, method, k, prior, expert_forward_passes, seconds`` (and ``routing``, ``n_clusters``); a
few-shot row has no tokens/nll/ppl, so it lives in its own table instead of leaving the
perplexity columns empty.

Both files of a table hold the same rows and are rewritten atomically on every append (under
one file lock per results dir, so parallel jobs of one run do not lose each other's rows). A row
whose key is already present replaces the old row, so re-running an evaluation updates the
table instead of duplicating it. ``analysis/`` reads only these tables (and ``records/``).
pandas only: no torch, no fairseq, no lm_eval.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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

FEWSHOT_REQUIRED: dict[str, tuple[str, str]] = {
    "run": ("str", "run name (the few-shot config's name unless given)"),
    "task": ("str", "lm-evaluation-harness task name"),
    "metric": ("str", "lm-eval metric, e.g. acc, acc_norm, f1"),
    "filter": ("str", "lm-eval filter the metric was computed after ('none' for log-likelihood tasks)"),
    "value": ("float", "the metric's value"),
    "method": ("str", "as in results.csv: dense, expert:<name>, ensemble_*, topk_prior, average_*, cbtm_cluster"),
    "k": ("int", "experts that score each answer option (1 for a single model)"),
    "routing": ("str", "how the experts are weighted, e.g. 'prompt:tfidf-svd(T=0.1)', 'token:posterior'; 'none' for one model"),
    "prior": ("str", "the prior of the weights ('uniform', a prior file or weights); 'none' if none"),
    "num_fewshot": ("int", "demonstrations in each prompt"),
    "seed": ("int", "seed of lm-eval's few-shot sampler (which demonstrations)"),
    "samples": ("int", "documents evaluated"),
    "expert_forward_passes": ("int", "sequences run through one expert each for this (task, seed, method)"),
    "seconds": ("float", "wall-clock seconds of this (task, seed, method) evaluation"),
}
FEWSHOT_OPTIONAL: dict[str, tuple[str, str]] = {
    "stderr": ("float", "lm-eval's standard error of the value (empty when lm-eval gives none)"),
    "better": ("str", "'higher' or 'lower': which values of the metric are better (lm-eval's higher_is_better)"),
    "n_clusters": ("int", "c-BTM: number of clusters"),
    "notes": ("str", "free text"),
}
FEWSHOT_KEY = ["run", "task", "metric", "filter", "method", "k", "routing", "prior", "num_fewshot", "seed"]


def results_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "results"


@dataclass(frozen=True)
class TableSpec:
    """One results table: its file stem under RUN/results/, columns, key and value checks."""
    name: str
    required: dict
    optional: dict
    key: list
    check: Callable[[pd.DataFrame], None]

    @property
    def columns(self) -> dict:
        return {**self.required, **self.optional}


def validate_rows(rows, spec: "TableSpec | None" = None) -> pd.DataFrame:
    """Rows (list of dicts or a DataFrame) as a typed DataFrame in column order, or BtmError
    naming the row and column at fault. ``spec``: the table (default: RESULTS)."""
    spec = spec or RESULTS
    columns = spec.columns
    df = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows.copy()
    if df.empty:
        raise BtmError(f"no {spec.name} rows to write")
    unknown = [c for c in df.columns if c not in columns]
    if unknown:
        raise BtmError(f"{spec.name}: unknown column {unknown[0]!r}; known columns: {', '.join(columns)}")
    for col in spec.required:
        if col not in df.columns:
            raise BtmError(f"{spec.name}: missing required column {col!r} ({spec.required[col][1]})")
        missing = df[col].isna()
        if missing.any():
            raise BtmError(f"{spec.name}: column {col!r} is empty in row {_first(missing)}")
    out = pd.DataFrame(index=df.index)
    for col in columns:
        if col not in df.columns:
            continue
        out[col] = _typed(df[col], col, columns[col][0], spec.name)
    spec.check(out)
    return out.reset_index(drop=True)


def _typed(series: pd.Series, col: str, kind: str, table: str = "results") -> pd.Series:
    if kind == "str":
        bad = series.map(lambda v: not (isinstance(v, str) or pd.isna(v)), na_action=None)
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise BtmError(f"{table}: column {col!r} must be text; row {i} has {series.iloc[i]!r}")
        return series.astype("string")
    numeric = pd.to_numeric(series, errors="coerce")
    bad = numeric.isna() & series.notna()
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise BtmError(f"{table}: column {col!r} must be a number; row {i} has {series.iloc[i]!r}")
    if kind == "int":
        frac = numeric.notna() & (numeric != numeric.round())
        if frac.any():
            i = int(frac.to_numpy().argmax())
            raise BtmError(f"{table}: column {col!r} must be a whole number; row {i} has {series.iloc[i]!r}")
        return numeric.round().astype("Int64")
    return numeric.astype("float64")


def _first(mask) -> int:
    return int(np.asarray(mask).argmax())


def _check_common(df: pd.DataFrame, table: str, nonneg: tuple, positive: tuple) -> None:
    methods = df["method"].astype(str)
    bad = ~(methods.isin(METHODS) | methods.str.fullmatch(_EXPERT_METHOD.pattern))
    if bad.any():
        i = _first(bad)
        raise BtmError(f"{table}: column 'method' row {i} has unknown method {methods.iloc[i]!r}; "
                       f"use expert:<name> or one of {', '.join(sorted(METHODS))}")
    for col in nonneg:
        neg = (df[col] < 0).to_numpy(dtype=bool)
        if neg.any():
            raise BtmError(f"{table}: column {col!r} must be >= 0; row {_first(neg)} is negative")
    for col in positive:
        zero = (df[col] < 1).to_numpy(dtype=bool)
        if zero.any():
            raise BtmError(f"{table}: column {col!r} must be >= 1; row {_first(zero)} is 0")


def _check_values(df: pd.DataFrame) -> None:
    _check_common(df, "results", ("k", "tokens", "expert_forward_passes", "seconds"), ("k", "tokens"))
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


def _check_fewshot(df: pd.DataFrame) -> None:
    _check_common(df, "fewshot", ("k", "num_fewshot", "samples", "expert_forward_passes", "seconds"),
                  ("k", "samples"))
    value = df["value"].to_numpy()
    bad = ~np.isfinite(value)
    if bad.any():
        raise BtmError(f"fewshot: column 'value' row {_first(bad)} must be finite, got {value[_first(bad)]}")
    if "better" in df.columns:
        better = df["better"].astype(object)
        bad = ~(better.isna() | better.isin(["higher", "lower"])).to_numpy(dtype=bool)
        if bad.any():
            raise BtmError(f"fewshot: column 'better' row {_first(bad)} must be 'higher' or 'lower', "
                           f"got {better.iloc[_first(bad)]!r}")


RESULTS = TableSpec("results", REQUIRED_COLUMNS, OPTIONAL_COLUMNS, KEY_COLUMNS, _check_values)
FEWSHOT = TableSpec("fewshot", FEWSHOT_REQUIRED, FEWSHOT_OPTIONAL, FEWSHOT_KEY, _check_fewshot)


def read_results(path: str | os.PathLike, spec: TableSpec | None = None) -> pd.DataFrame:
    """A results table from a run dir, its results/ dir, or a <table>.csv/.parquet file
    (``spec``: which table; default RESULTS)."""
    spec = spec or RESULTS
    path = Path(path)
    if path.is_dir():
        rdir = path if path.name == "results" and not (path / "results").is_dir() else results_dir(path)
        parquet, csv = rdir / f"{spec.name}.parquet", rdir / f"{spec.name}.csv"
        path = parquet if parquet.exists() else csv
    if not path.exists():
        raise BtmError(f"no {spec.name} table at {path}")
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix == ".csv":
            df = pd.read_csv(path, keep_default_na=False, na_values=[""],
                             dtype={c: "string" for c, (k, _) in spec.columns.items() if k == "str"})
        else:
            raise BtmError(f"{path}: results table must be .csv or .parquet")
    except (OSError, ValueError) as e:
        raise BtmError(f"could not read results table {path}: {e}") from e
    try:
        return validate_rows(df, spec)
    except BtmError as e:
        raise BtmError(f"{path}: {e}") from None


def read_fewshot(path: str | os.PathLike) -> pd.DataFrame:
    """The few-shot table (``RUN/results/fewshot.*``) from a run dir, results/ dir or file."""
    return read_results(path, FEWSHOT)


def append_results(run_dir: str | os.PathLike, rows, spec: TableSpec | None = None) -> pd.DataFrame:
    """Add rows to RUN_DIR/results/<table>.{csv,parquet} (default: results); a row with an
    existing key replaces the old one. Both files are rewritten atomically. Returns the whole
    table, whose last ``len(rows)`` rows are the new ones (when the new rows have distinct keys)."""
    from filelock import FileLock

    spec = spec or RESULTS
    new = validate_rows(rows, spec)
    rdir = results_dir(run_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(rdir / ".results.lock")):
        parquet, csv = rdir / f"{spec.name}.parquet", rdir / f"{spec.name}.csv"
        old = read_results(parquet, spec) if parquet.exists() else (
            read_results(csv, spec) if csv.exists() else None)
        # Both parts are validated and typed; the new rows end the table (keep="last").
        table = new if old is None else pd.concat([old, new], ignore_index=True)
        table = table.drop_duplicates(subset=spec.key, keep="last").reset_index(drop=True)
        with atomic_path(csv) as tmp:
            table.to_csv(tmp, index=False)
        with atomic_path(parquet) as tmp:
            table.to_parquet(tmp, index=False)
    return table


def append_fewshot(run_dir: str | os.PathLike, rows) -> pd.DataFrame:
    """``append_results`` for the few-shot table (``RUN_DIR/results/fewshot.*``)."""
    return append_results(run_dir, rows, FEWSHOT)
