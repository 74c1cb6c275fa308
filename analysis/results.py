"""Load and validate what the report reads from one run directory.

A run directory gives the report five things, all optional except that one of the two results
tables must be there:

- ``results/results.parquet`` or ``results/results.csv`` (parquet preferred: it keeps types):
  the tidy perplexity table of docs/architecture.md ("Results table"), read and validated by
  ``launcher.contract.results`` (the one validator of the table).
- ``results/fewshot.parquet`` or ``.csv``: few-shot harness results (same section; validated by
  ``launcher.contract.results.FEWSHOT``).
- ``config.yaml``: domain roles, seed fraction, c-BTM cluster count (``read_config``).
  Without it, domains have no roles and come from the table.
- ``records/*.json``: one record per finished job unit (compute accounting, analysis/tables.py).
- ``priors/*.json``: cached domain priors (two layouts, see ``load_priors``).
- ``results/ablation.csv``: the expert-removal table of ``btm forest ablate``
  (``launcher.contract.ablation``).
- ``results/routing.*`` and ``results/inference.*``: a MoE model's routing statistics and its
  inference speed against one expert (``launcher.contract.moe_tables``).

Everything here is read-only; a malformed file raises ``BtmError`` naming the file and the
column, key or line at fault.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from launcher.contract.ablation import read_ablation
from launcher.contract.errors import BtmError
from launcher.contract.layout import RunLayout

from launcher.contract.methods import EXPERT_PREFIX, is_expert_method  # noqa: F401  (re-exported)
from launcher.contract.moe_tables import INFERENCE, ROUTING
from launcher.contract.results import RESULTS, TableSpec, read_fewshot, read_results

# The tables compute with numbers and text: numeric columns as float (NaN: no value), text
# columns as str ("" for no value in prior, routing and notes).
_NUMBER_KINDS = ("int", "float")
_BLANK_WHEN_MISSING = ("prior", "routing", "notes")


@dataclass
class RunData:
    """Everything the report uses from one run directory."""

    label: str                      # the run's name in tables, plots and file names
    path: Path
    results: pd.DataFrame           # the validated results table (analysis/tables.py adds labels)
    results_file: Path | None       # None: the run has few-shot results only
    config: dict = field(default_factory=dict)
    train_domains: list[str] | None = None   # None: config.yaml missing or silent
    eval_domains: list[str] | None = None    # held out: evaluated, never trained on
    seed_fraction: float | None = None
    n_clusters: int | None = None
    records: list[dict] = field(default_factory=list)
    priors: list[dict] = field(default_factory=list)
    fewshot: pd.DataFrame | None = None      # the few-shot table, when the run has one
    ablation: pd.DataFrame | None = None     # results/ablation.csv (`btm forest ablate`), if any
    routing: pd.DataFrame | None = None      # the MoE's routing table (results/routing.*), if any
    inference: pd.DataFrame | None = None    # the MoE's speed table (results/inference.*), if any
    notes: list[str] = field(default_factory=list)   # things the reader should know


def load_run(run_dir: str | Path, label: str | None = None) -> RunData:
    """Read and validate one run directory (see the module docstring for what is read)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise BtmError(f"run directory {path} does not exist (or is not a directory)")
    fewshot = load_fewshot_table(path)
    if fewshot is not None and not any((path / "results" / f"results.{ext}").is_file()
                                       for ext in ("parquet", "csv")):
        results, results_file = empty_results(), None
    else:
        results, results_file = load_results_table(path)
    run = RunData(label=label or safe_label(path.resolve().name), path=path, results=results,
                  results_file=results_file, fewshot=fewshot)
    config_file = path / "config.yaml"
    if config_file.is_file():
        read_config(run, config_file)
    else:
        run.notes.append(f"{config_file} not found: domain roles (train/eval) come from the "
                         "results table alone")
    run.routing = load_moe_table(path, ROUTING)
    run.inference = load_moe_table(path, INFERENCE)
    run.records = load_records(path / "records")
    run.priors = load_priors(path / "priors")
    run.ablation = read_ablation(RunLayout(path).ablation)
    return run


def load_runs(run_dirs: list[str | Path]) -> list[RunData]:
    """Load several runs with unique labels: the directory name, else ``parent/name``."""
    if not run_dirs:
        raise BtmError("no run directory given")
    paths = [Path(p) for p in run_dirs]
    names = [p.resolve().name for p in paths]
    labels = [f"{p.resolve().parent.name}_{name}" if names.count(name) > 1 else name
              for p, name in zip(paths, names)]
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):   # still equal (same dir twice, or a/x and b/x)
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab}_{seen[lab]}"
    return [load_run(p, safe_label(lab)) for p, lab in zip(paths, labels)]


def safe_label(text: str) -> str:
    """A label usable as part of a file name (letters, digits, ``_.-``)."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "run"
    return out.replace("..", "_")


# --------------------------------------------------------------------------- results table

def load_results_table(run_dir: Path) -> tuple[pd.DataFrame, Path]:
    """RUN/results/results.parquet (or .csv), validated by launcher.contract.results, in the
    form the tables compute with (``for_tables``)."""
    parquet = run_dir / "results" / "results.parquet"
    csv = run_dir / "results" / "results.csv"
    source = parquet if parquet.is_file() else csv
    if not source.is_file():
        raise BtmError(f"no results table in {run_dir / 'results'} (expected results.parquet or "
                       "results.csv; run `btm eval` first)")
    # The results dir, not one file: a damaged twin of the table is refused, never half-read.
    return for_tables(read_results(run_dir / "results")), source


def load_moe_table(run_dir: Path, spec: TableSpec) -> pd.DataFrame | None:
    """RUN/results/<spec.name>.{parquet,csv} (a MoE's routing or inference table) validated
    against ``spec``, or None when the run has neither file."""
    rdir = run_dir / "results"
    if not any((rdir / f"{spec.name}.{ext}").is_file() for ext in ("parquet", "csv")):
        return None
    return read_results(rdir, spec)


def load_fewshot_table(run_dir: Path) -> pd.DataFrame | None:
    """RUN/results/fewshot.{parquet,csv} validated against launcher.contract.results.FEWSHOT, or None."""
    rdir = run_dir / "results"
    if not any((rdir / f"fewshot.{ext}").is_file() for ext in ("parquet", "csv")):
        return None
    df = read_fewshot(rdir)
    if "better" not in df.columns:
        df["better"] = pd.NA
    return df


def for_tables(table: pd.DataFrame) -> pd.DataFrame:
    """A validated results table with every column of the schema, numbers as float and text as
    str (missing optional columns added as no value)."""
    df = pd.DataFrame(index=table.index)
    for col, (kind, _) in RESULTS.columns.items():
        values = table[col] if col in table.columns else pd.Series(pd.NA, index=table.index, dtype=object)
        if kind in _NUMBER_KINDS:
            df[col] = pd.to_numeric(values, errors="coerce").astype(float)
        elif col in _BLANK_WHEN_MISSING:
            df[col] = values.map(lambda v: "" if pd.isna(v) else str(v)).astype(object)
        else:
            df[col] = values.astype(object)
    return df.reset_index(drop=True)


def empty_results() -> pd.DataFrame:
    """A perplexity table with the contract's columns and no rows (a few-shot-only run)."""
    return for_tables(pd.DataFrame({col: pd.Series(dtype=object) for col in RESULTS.required}))


# --------------------------------------------------------------------------- config.yaml

def _read_yaml(path: Path) -> dict:
    import yaml
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BtmError(f"cannot parse {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BtmError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def read_config(run: RunData, config_file: Path) -> None:
    """Domain roles, seed fraction and cluster count of a run from its config.yaml.

    Training domains: ``train_domains``, else ``domains.train`` plus ``domains.incremental``
    (the launcher's layout). Evaluation domains are the paper's held-out ones: ``eval_domains``
    or ``domains.eval``, minus the training domains (a config may evaluate on its training
    domains too). ``n_clusters``: that key, else ``clusters.k`` when ``method`` is ``cbtm``.
    """
    config = run.config = _read_yaml(config_file)
    domains = config.get("domains") if isinstance(config.get("domains"), dict) else {}
    train = _domain_list(config, "train_domains", config_file)
    if train is None and "train" in domains:
        train = (_domain_list(domains, "train", config_file, "domains.train") or []) + (
            _domain_list(domains, "incremental", config_file, "domains.incremental") or [])
    evaluated = _domain_list(config, "eval_domains", config_file)
    if evaluated is None and "eval" in domains:
        evaluated = _domain_list(domains, "eval", config_file, "domains.eval")
    run.train_domains = train
    if evaluated is not None:
        run.eval_domains = [d for d in evaluated if d not in (train or [])]
    run.seed_fraction = _number(config, "seed_fraction", config_file, float)
    run.n_clusters = _number(config, "n_clusters", config_file, int)
    clusters = config.get("clusters")
    if run.n_clusters is None and config.get("method") == "cbtm" and isinstance(clusters, dict):
        run.n_clusters = _number(clusters, "k", config_file, int, "clusters.k")


def find_key(config: dict, key: str) -> Any:
    """The value of ``key`` at the shallowest depth of a nested mapping (breadth first)."""
    level = [config]
    while level:
        for mapping in level:
            if key in mapping:
                return mapping[key]
        level = [v for m in level for v in m.values() if isinstance(v, dict)]
    return None


def _domain_list(config: dict, key: str, path: Path, shown: str | None = None) -> list[str] | None:
    value = find_key(config, key)
    if value is None:
        return None
    if isinstance(value, dict):  # {domain: weight} is also a list of domains
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise BtmError(f"{path}: key {shown or key} must be a list of domain names, got {value!r}")
    return list(value)


def _number(config: dict, key: str, path: Path, kind: type, shown: str | None = None) -> Any:
    value = find_key(config, key)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise BtmError(f"{path}: key {shown or key} must be a number, got {value!r}") from None


# --------------------------------------------------------------------------- records

def load_records(records_dir: Path) -> list[dict]:
    """Read records/*.json; each gets ``_file`` (its path) and ``_source`` added.

    Wall time is ``sacct.elapsed_s`` when present, else ``finished - started`` (``_source`` =
    "local wall clock"); CPU and GPU seconds come only from ``sacct`` (None when absent).
    """
    if not records_dir.is_dir():
        return []
    records = []
    for f in _json_files(records_dir):
        rec = _read_json(f)
        if not isinstance(rec, dict):
            raise BtmError(f"record {f} must be a JSON object")
        stage = rec.get("stage") or f.name.split(".")[0]
        sacct = rec.get("sacct")
        if sacct is not None and not isinstance(sacct, dict):
            raise BtmError(f"record {f}: key sacct must be an object, got {sacct!r}")
        out = {"stage": str(stage), "unit": rec.get("unit") or "", "_file": f,
               "train": rec["train"] if isinstance(rec.get("train"), dict) else None,  # training stages
               "started_s": None if rec.get("started") is None else _timestamp(rec["started"], f, "started")}
        if sacct:
            out["wall_s"] = _seconds(sacct.get("elapsed_s"), f, "sacct.elapsed_s")
            out["cpu_s"] = _seconds(sacct.get("cpu_s"), f, "sacct.cpu_s")
            out["gpu_s"] = _seconds(sacct.get("gpu_s"), f, "sacct.gpu_s")
            out["_source"] = "sacct"
            if out["wall_s"] is None:
                out["wall_s"] = _wall_clock(rec, f)
        else:
            out["wall_s"] = _wall_clock(rec, f)
            out["cpu_s"] = None
            out["gpu_s"] = None
            out["_source"] = "local wall clock"
        records.append(out)
    return records


def _seconds(value: Any, path: Path, key: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise BtmError(f"record {path}: key {key} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise BtmError(f"record {path}: key {key} must be >= 0, got {value!r}")
    return seconds


def _timestamp(value: Any, path: Path, key: str) -> float:
    """Epoch seconds from a number or an ISO-8601 string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            pass
    raise BtmError(f"record {path}: key {key} must be an ISO-8601 time or epoch seconds, got {value!r}")


def _wall_clock(rec: dict, path: Path) -> float | None:
    if rec.get("started") is None or rec.get("finished") is None:
        return None
    seconds = _timestamp(rec["finished"], path, "finished") - _timestamp(rec["started"], path, "started")
    if seconds < 0:
        raise BtmError(f"record {path}: finished is before started")
    return seconds


# --------------------------------------------------------------------------- priors

def load_priors(priors_dir: Path) -> list[dict]:
    """Read priors/*.json, oldest first (a later file for the same prior supersedes it).

    Accepted layouts: ``{"eval_domain", "experts": [...], "prior": [...], "forest"?}`` and the
    one fairseq_ext/priors.py writes, ``{"key": {"domain", "experts", "settings", ...},
    "prior": [...], "by_expert": {...}}``. Returns dicts with ``eval_domain``, ``experts``,
    ``prior`` (floats), ``forest`` (the optional key, else ""), ``settings`` (a short text of
    ``key.settings``, else "") and ``_file``.
    """
    if not priors_dir.is_dir():
        return []
    priors = []
    files = sorted(_json_files(priors_dir), key=lambda f: (f.stat().st_mtime_ns, f.name))
    for f in files:
        data = _read_json(f)
        if not isinstance(data, dict):
            raise BtmError(f"prior file {f} must be a JSON object")
        key = data.get("key") if isinstance(data.get("key"), dict) else {}
        domain = data.get("eval_domain", key.get("domain"))
        experts = data.get("experts", key.get("experts"))
        if experts is None and isinstance(data.get("by_expert"), dict):
            experts = list(data["by_expert"])
        prior = data.get("prior")
        for name, value in (("eval_domain", domain), ("experts", experts), ("prior", prior)):
            if value is None:
                raise BtmError(f"prior file {f} lacks key {name}")
        if not isinstance(experts, list) or not isinstance(prior, list) or len(experts) != len(prior):
            raise BtmError(f"prior file {f}: experts and prior must be lists of the same length "
                           f"(got {len(experts) if isinstance(experts, list) else experts!r} experts, "
                           f"{len(prior) if isinstance(prior, list) else prior!r} prior values)")
        try:
            values = [float(p) for p in prior]
        except (TypeError, ValueError):
            raise BtmError(f"prior file {f}: prior must hold numbers, got {prior!r}") from None
        settings = key.get("settings")
        settings = (", ".join(f"{k}={v}" for k, v in settings.items())
                    if isinstance(settings, dict) else str(settings or ""))
        priors.append({"eval_domain": str(domain), "experts": [str(e) for e in experts],
                       "prior": values, "forest": str(data.get("forest") or ""),
                       "settings": settings, "_file": f})
    return priors


def _json_files(directory: Path) -> list[Path]:
    """``*.json`` in a directory, without hidden files (``records/.hashes.json``)."""
    return sorted(f for f in directory.glob("*.json") if not f.name.startswith("."))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BtmError(f"cannot parse {path}: {e.msg} at line {e.lineno}") from None
    except UnicodeDecodeError as e:
        raise BtmError(f"cannot read {path}: {e}") from None
