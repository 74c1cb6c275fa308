"""The results tables: tidy rows, one per evaluated (run, method, variant, data).

A MoE model's routing and speed tables (``ROUTING``, ``INFERENCE``) are defined in
launcher.contract.moe_tables and stored, locked and validated by the functions here.
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

An append validates only the new rows: the existing table was validated when it was written,
so it is only checked to be ours (known columns, the required ones present, our dtypes) before
the new rows join it; anything else gets the full validation, whose errors name the file.
Re-mixing a forest appends a few rows to a table that grows with every setting tried, and
re-validating the whole table each time was most of a re-mix's cost.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from launcher.contract.atomic import atomic_path
from launcher.contract.errors import BtmError, shown
from launcher.contract.methods import RESULT_METHODS, is_result_method

def column_table(table: str) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(required, optional) ``{column: (kind, help)}`` from a table of ``name kind help`` lines;
    a name ending in ``?`` is optional. Kinds: str, int, float."""
    required, optional = {}, {}
    for line in filter(None, (line.strip() for line in table.splitlines())):
        name, kind, help_ = line.split(None, 2)
        (optional if name.endswith("?") else required)[name.rstrip("?")] = (kind, help_)
    return required, optional


REQUIRED_COLUMNS, OPTIONAL_COLUMNS = column_table("""
    run                    str    run name (the run directory's name unless given)
    method                 str    expert:<name> or a registered method (launcher.contract.methods)
    k                      int    number of experts whose scores the method used (1 for a single model)
    prior                  str    prior settings, e.g. 'ewma(alpha=0.3,batches=all,batch_docs=2,split=valid)'; 'none' if none
    eval_domain            str    domain of the evaluation data
    split                  str    valid or test
    tokens                 int    number of target tokens scored
    nll                    float  mean natural-log loss per token
    ppl                    float  exp(nll)
    expert_forward_passes  int    forward passes actually run for this row (0 on a cache hit)
    seconds                float  wall-clock seconds this row cost (scoring done now + mixing)
    seed_fraction?         float  fraction of the compute budget spent on the seed LM
    n_clusters?            int    c-BTM: number of clusters
    routing?               str    c-BTM: routing settings
    notes?                 str    free text
""")
COLUMNS = {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}
KEY_COLUMNS = ["run", "method", "k", "prior", "eval_domain", "split"]


_DTYPES = {"str": "string", "int": "Int64", "float": "float64"}

FEWSHOT_REQUIRED, FEWSHOT_OPTIONAL = column_table("""
    run                    str    run name (the few-shot config's name unless given)
    task                   str    lm-evaluation-harness task name
    metric                 str    lm-eval metric, e.g. acc, acc_norm, f1
    filter                 str    lm-eval filter the metric was computed after ('none' for log-likelihood tasks)
    value                  float  the metric's value
    method                 str    as in results.csv: expert:<name> or a registered method
    k                      int    experts that score each answer option (1 for a single model)
    routing                str    how the experts are weighted, e.g. 'prompt:tfidf-svd(T=0.1)', 'token:posterior'; 'none' for one model
    prior                  str    the prior of the weights ('uniform', a prior file or weights); 'none' if none
    num_fewshot            int    demonstrations in each prompt
    seed                   int    seed of lm-eval's few-shot sampler (which demonstrations)
    samples                int    documents evaluated
    expert_forward_passes  int    sequences run through one expert each for this (task, seed, method)
    seconds                float  wall-clock seconds of this (task, seed, method) evaluation
    stderr?                float  lm-eval's standard error of the value (empty when lm-eval gives none)
    better?                str    'higher' or 'lower': which values of the metric are better (lm-eval's higher_is_better)
    n_clusters?            int    c-BTM: number of clusters
    notes?                 str    free text
""")
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
    check: Callable[[dict], None]  # {column: numpy array of typed values} -> raises BtmError

    @property
    def columns(self) -> dict:
        return {**self.required, **self.optional}


def validate_rows(rows, spec: "TableSpec | None" = None) -> pd.DataFrame:
    """Rows (list of dicts or a DataFrame) as a typed DataFrame in column order, or BtmError
    naming the table, row and column at fault. ``spec``: the table (default: RESULTS).

    The checks run on plain numpy arrays, one column at a time, and the typed table is built
    once at the end: every pandas operation has a fixed cost of tens of microseconds, and
    appending a few rows (a re-mix) should not pay it once per check."""
    spec = spec or RESULTS
    known = spec.columns
    columns = _columns(rows)
    if not columns or not len(next(iter(columns.values()))):
        raise BtmError(f"no {spec.name} rows")
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise BtmError(f"{spec.name}: unknown column {shown(unknown[0])}; known columns: {', '.join(known)}")
    for col in spec.required:
        if col not in columns:
            raise BtmError(f"{spec.name}: missing required column {col!r} ({spec.required[col][1]})")
        missing = pd.isna(columns[col])
        if missing.any():
            raise BtmError(f"{spec.name}: column {col!r} is empty in row {first_row(missing)}")
    values = {col: _typed(columns[col], col, kind, spec.name)
              for col, (kind, _) in known.items() if col in columns}
    spec.check(values)
    return pd.DataFrame({col: pd.array(v, dtype=_DTYPES[known[col][0]]) for col, v in values.items()})


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


def _typed(values: np.ndarray, col: str, kind: str, table: str = "results") -> np.ndarray:
    """The column as an object array of str or None (text) or a float64 array with NaN for
    missing values (numbers; whole numbers checked for ``int``)."""
    if kind == "str":
        for i, v in enumerate(values):
            if isinstance(v, str):
                continue
            if not pd.isna(v):
                raise BtmError(f"{table}: column {col!r} must be text; row {i} has {shown(v)}")
            values[i] = None  # values is our own copy (_columns)
        return values
    given = ~pd.isna(values)
    numeric = np.asarray(pd.to_numeric(values, errors="coerce"), dtype="float64")
    bad = np.isnan(numeric) & given
    if bad.any():
        i = first_row(bad)
        raise BtmError(f"{table}: column {col!r} must be a number; row {i} has {shown(values[i])}")
    if kind == "int":
        frac = ~np.isnan(numeric) & (numeric != np.round(numeric))
        if frac.any():
            i = first_row(frac)
            raise BtmError(f"{table}: column {col!r} must be a whole number; row {i} has {shown(values[i])}")
        return np.round(numeric)
    return numeric


def first_row(mask) -> int:
    return int(np.asarray(mask).argmax())


def _check_common(cols: dict[str, np.ndarray], table: str, nonneg: tuple, positive: tuple) -> None:
    for i, method in enumerate(cols["method"]):
        if not is_result_method(method):
            raise BtmError(f"{table}: column 'method' row {i} has unknown method {shown(method)}; "
                           f"use expert:<name> or one of {', '.join(RESULT_METHODS)}")
    for col in nonneg:
        neg = cols[col] < 0
        if neg.any():
            raise BtmError(f"{table}: column {col!r} must be >= 0; row {first_row(neg)} is negative")
    for col in positive:
        zero = cols[col] < 1
        if zero.any():
            raise BtmError(f"{table}: column {col!r} must be >= 1; row {first_row(zero)} is 0")


def _check_values(cols: dict[str, np.ndarray]) -> None:
    _check_common(cols, "results", ("k", "tokens", "expert_forward_passes", "seconds"), ("k", "tokens"))
    nll, ppl = cols["nll"], cols["ppl"]
    bad = ~np.isfinite(nll) | (nll < 0)
    if bad.any():
        i = first_row(bad)
        raise BtmError(f"results: column 'nll' row {i} must be a finite non-negative loss, got {nll[i]}")
    with np.errstate(over="ignore"):
        bad = ~np.isclose(ppl, np.exp(nll), rtol=1e-6, atol=0)
    if bad.any():
        i = first_row(bad)
        raise BtmError(f"results: column 'ppl' row {i} is {ppl[i]} but exp(nll) = {math.exp(nll[i])}")


def _check_fewshot(cols: dict[str, np.ndarray]) -> None:
    _check_common(cols, "fewshot", ("k", "num_fewshot", "samples", "expert_forward_passes", "seconds"),
                  ("k", "samples"))
    value = cols["value"]
    bad = ~np.isfinite(value)
    if bad.any():
        raise BtmError(f"fewshot: column 'value' row {first_row(bad)} must be finite, got {value[first_row(bad)]}")
    for i, better in enumerate(cols.get("better", ())):
        if better is not None and better not in ("higher", "lower"):
            raise BtmError(f"fewshot: column 'better' row {i} must be 'higher' or 'lower', got {shown(better)}")


RESULTS = TableSpec("results", REQUIRED_COLUMNS, OPTIONAL_COLUMNS, KEY_COLUMNS, _check_values)
FEWSHOT = TableSpec("fewshot", FEWSHOT_REQUIRED, FEWSHOT_OPTIONAL, FEWSHOT_KEY, _check_fewshot)

def read_results(path: str | os.PathLike, spec: TableSpec | None = None) -> pd.DataFrame:
    """A results table from a run dir, its results/ dir, or a <table>.csv/.parquet file
    (``spec``: which table; default RESULTS)."""
    spec = spec or RESULTS
    path = Path(path)
    if path.is_dir():
        rdir = path if path.name == "results" and not (path / "results").is_dir() else results_dir(path)
        table = read_table_files(rdir, spec, repair=False)
        if table is None:
            raise BtmError(f"no {spec.name} table in {rdir}")
        return table
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
        old = read_table_files(rdir, spec, repair=True)
        # Both parts are validated and typed; the new rows end the table (keep="last").
        table = new if old is None else _typed_columns(pd.concat([old, new], ignore_index=True), spec)
        table = table.drop_duplicates(subset=spec.key, keep="last").reset_index(drop=True)
        # Parquet first: it is what readers and the next append prefer, so a crash between the
        # two renames leaves a stale csv (rewritten by the next append), never lost rows.
        with atomic_path(parquet) as tmp:
            table.to_parquet(tmp, index=False)
        with atomic_path(csv) as tmp:
            table.to_csv(tmp, index=False)
    return table


def append_fewshot(run_dir: str | os.PathLike, rows) -> pd.DataFrame:
    """``append_results`` for the few-shot table (``RUN_DIR/results/fewshot.*``)."""
    return append_results(run_dir, rows, FEWSHOT)


def read_table_files(rdir: Path, spec: TableSpec, *, repair: bool) -> pd.DataFrame | None:
    """The table held by ``rdir``'s two files, parquet first (None when there is neither).

    Both are written with the same rows, so a file that cannot be read or holds other rows than
    its twin was damaged after the fact (a truncated csv still parses, minus its last rows).
    ``repair`` (an append, which rewrites both): use the intact twin, with a warning. Otherwise
    (readers): refuse, naming the damaged file and the command that fixes it; a report never
    uses a fraction of the rows."""
    parquet, csv = rdir / f"{spec.name}.parquet", rdir / f"{spec.name}.csv"
    if not parquet.exists():
        return read_results(csv, spec) if csv.exists() else None
    try:
        table, intact, damaged, why = _read_own_table(parquet, spec), parquet, csv, None
        if csv.exists():
            why = _csv_problem(csv, len(table), spec)
    except BtmError as e:
        if not csv.exists():
            raise BtmError(f"{e}; delete it (`rm {parquet}`) and evaluate again") from None
        try:
            table, intact, damaged, why = read_results(csv, spec), csv, parquet, str(e)
        except BtmError as e2:
            raise BtmError(f"both files of the {spec.name} table are damaged ({e}; {e2}); delete them "
                           f"(`rm {parquet} {csv}`) and evaluate again") from None
    if why and not repair:
        raise BtmError(f"{why}: it was damaged; {intact} holds the table: delete the damaged file "
                       f"(`rm {damaged}`) and the next `btm run` or `btm eval` rewrites it from {intact.name}")
    if why:
        print(f"btm: warning: {why}; rewriting it from {intact}", file=sys.stderr)
    return table


def _csv_problem(csv: Path, rows: int, spec: TableSpec) -> str | None:
    """Why the csv twin of a ``rows``-row table is damaged, or None. Only parsed and counted,
    not validated: an append re-validates nothing old (the parquet twin was validated)."""
    try:
        df = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as e:
        return f"{csv} cannot be read ({e})"
    if len(df) != rows:
        return f"{csv} holds {len(df)} rows but its twin {csv.with_suffix('.parquet').name} holds {rows}"
    missing = [c for c in spec.required if c not in df.columns or df[c].isna().any()]
    return f"{csv} has cut rows (empty {', '.join(missing)})" if missing else None


def _read_own_table(path: Path, spec: TableSpec) -> pd.DataFrame:
    """The existing table at ``path`` (parquet). One that append_results wrote (known columns,
    required ones present, our dtypes) is returned as read: it was validated when written.
    Anything else is validated in full, so a foreign or hand-edited file gets an error naming
    it and the column at fault (or is accepted and typed, if its values are valid)."""
    import pyarrow.parquet as pq

    try:  # one file: ParquetFile skips pd.read_parquet's dataset discovery (a third of the read)
        df = pq.ParquetFile(path).read().to_pandas()
    except (OSError, ValueError) as e:
        raise BtmError(f"could not read results table {path}: {e}") from e
    columns = spec.columns
    ours = (set(spec.required) <= set(df.columns) <= set(columns)
            and all(df[c].dtype == _DTYPES[columns[c][0]] for c in df.columns))
    if ours:
        return df
    try:
        return validate_rows(df, spec)
    except BtmError as e:
        raise BtmError(f"{path}: {e}") from None


def _typed_columns(df: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Columns in schema order with our dtypes (a concat of tables with different optional
    columns fills the gaps with missing values that may not keep the dtype)."""
    columns = spec.columns
    recast = {c: _DTYPES[columns[c][0]] for c in df.columns if df[c].dtype != _DTYPES[columns[c][0]]}
    order = [c for c in columns if c in df.columns]
    df = df.astype(recast) if recast else df
    return df if list(df.columns) == order else df[order]
