"""Paper-style tables: perplexity per domain and method, cross-run summaries, compute hours.

The results of all runs are first combined into one long frame (``combine``) in which every
row has a ``run_label`` (which run directory) and a ``label`` (which column of the tables:
the method plus whichever of k, prior, clusters, routing, seed fraction tell its variants
apart). Tables are then plain pivots of that frame, rendered as Markdown, LaTeX or CSV with
the best (lowest) value of each row marked.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.render import MEAN_ROW
from analysis.results import RunData
from launcher.contract import methods as registry
from launcher.contract.errors import BtmError
from launcher.contract.layout import DENSE, RANDOM_SPLIT_PREFIX
from launcher.contract.methods import EXPERT_PREFIX, is_expert_method

# Columns that tell variants of one method apart; shown in a label only when they vary.
VARIANT_FIELDS = ["run", "k", "prior_variant", "n_clusters", "routing", "seed_fraction"]


@dataclass
class DomainGroup:
    key: str          # "train", "eval", "other" or "all" (no roles known)
    title: str
    domains: list[str]


# --------------------------------------------------------------------------- combining runs

def combine(runs: list[RunData]) -> tuple[pd.DataFrame, list[str]]:
    """One frame with ``run_label`` and ``label`` added; returns (frame, notes).

    ``n_clusters`` and ``seed_fraction`` missing in a row are taken from the run's config.yaml.
    Rows that repeat a (run, label, domain, split) keep the last one (a re-run appended it).
    """
    notes: list[str] = []
    frames = []
    for run in runs:
        df = run.results.copy()
        df["run_label"] = run.label
        if run.seed_fraction is not None:
            df["seed_fraction"] = df["seed_fraction"].fillna(run.seed_fraction)
        if run.n_clusters is not None:
            cbtm = df["method"].map(_kind) == "cluster"
            df.loc[cbtm, "n_clusters"] = df.loc[cbtm, "n_clusters"].fillna(run.n_clusters)
        frames.append(df)
    frame = pd.concat(frames, ignore_index=True)
    # A per-domain model (e.g. a posterior average built for its target domain) says so in its
    # prior ("...,target=<domain>"); it is one method column, not one column per target.
    frame["prior_variant"] = [re.sub(rf"target={re.escape(d)}(?=$|[,;) ])", "target=<domain>", p)
                              for p, d in zip(frame["prior"], frame["eval_domain"])]
    frame["label"] = variant_labels(frame)
    frame["order_key"] = [_order_key(r) for r in frame.itertuples()]
    key = ["run_label", "label", "eval_domain", "split"]
    dup = frame.duplicated(key, keep="last")
    if dup.any():
        for (run, label), n in frame[dup].groupby(["run_label", "label"]).size().items():
            notes.append(f"run {run}: {n} repeated row(s) of {label} (same domain and split); "
                         "the last one in the results table is used")
        frame = frame[~dup].reset_index(drop=True)
    return frame, notes


def variant_labels(frame: pd.DataFrame) -> list[str]:
    """A column label per row: method name plus the variant fields that vary for it."""
    varying: dict[str, set[str]] = {}
    for (_, method), group in frame.groupby(["run_label", "method"], sort=False):
        fields = {f for f in VARIANT_FIELDS if group[f].astype(str).nunique(dropna=False) > 1}
        if group["prior_variant"].str.contains("target=<domain>", regex=False, na=False).all():
            # A per-target model's k counts the experts its target's prior keeps (one on a
            # training domain, several on an unseen one): it follows the domain, not a setting.
            fields.discard("k")
        varying.setdefault(method, set()).update(fields)
    return [_label(row, varying.get(row.method, set())) for row in frame.itertuples()]


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) and not math.isnan(value) else "?"


def _kind(method: str) -> str:
    """The registered kind of a results method (the table was validated: all are registered)."""
    return registry.get_method(method).kind


def _label(row, varying: set[str]) -> str:
    method = row.method
    if is_expert_method(method):
        name = method[len(EXPERT_PREFIX):]
        text = f"Expert {name}"
    elif _kind(method) == "topk":
        text = f"Top-{_num(row.k)} prior"
    elif _kind(method) == "cluster":
        # Always top-k: it is c-BTM's inference budget, so runs line up in the tables.
        text = "c-BTM" if math.isnan(row.n_clusters) else f"c-BTM {_num(row.n_clusters)} clusters"
        if not math.isnan(row.k):
            text += f" top-{_num(row.k)}"
    else:
        text = registry.label(method)
    if "k" in varying and _kind(method) not in ("topk", "cluster"):
        text += f" k={_num(row.k)}"
    if "n_clusters" in varying and _kind(method) != "cluster":
        text += f" {_num(row.n_clusters)} clusters"
    if "prior_variant" in varying:
        text += f" [prior={row.prior_variant or '-'}]"
    if "routing" in varying:
        text += f" [routing={row.routing or '-'}]"
    if "seed_fraction" in varying:
        text += f" seed={_num(row.seed_fraction)}"
    if "run" in varying:
        text += f" [run={row.run}]"
    return text


def _order_key(row) -> tuple:
    method = row.method
    rank = registry.table_order(method)
    num = lambda v: -1.0 if math.isnan(v) else v  # noqa: E731
    return (rank, method, num(row.n_clusters), num(row.k), row.prior_variant, row.routing,
            num(row.seed_fraction), row.run)


def ordered_labels(frame: pd.DataFrame, experts: bool = False) -> list[str]:
    """Column labels in paper order; method columns, or (experts=True) the single experts."""
    rows = frame[frame["method"].map(is_expert_method) == experts].drop_duplicates("label")
    return [label for _, label in sorted(zip(rows["order_key"], rows["label"]))]


# --------------------------------------------------------------------------- domains

def domain_groups(run: RunData, domains_present: list[str]) -> tuple[list[DomainGroup], list[str]]:
    """Training / evaluation (/ other) domains of a run, as far as its results cover them."""
    notes = []
    present = set(domains_present)
    if run.train_domains is None and run.eval_domains is None:
        return [DomainGroup("all", "Domains (roles unknown: no train_domains/eval_domains in "
                            "config.yaml)", sorted(present))], notes
    groups = []
    listed: set[str] = set()
    for key, title, domains in (("train", "Training domains", run.train_domains),
                                ("eval", "Evaluation domains", run.eval_domains)):
        if domains is None:
            continue
        listed.update(domains)
        missing = [d for d in domains if d not in present]
        if missing:
            notes.append(f"run {run.label}: {key} domain(s) {', '.join(missing)} have no results")
        found = [d for d in domains if d in present]
        if found:
            groups.append(DomainGroup(key, title, found))
    other = sorted(present - listed)
    if other:
        groups.append(DomainGroup("other", "Other domains (not listed in config.yaml)", other))
    return groups, notes


# --------------------------------------------------------------------------- tables

def ppl_table(frame: pd.DataFrame, run_label: str, split: str, domains: list[str],
              labels: list[str]) -> pd.DataFrame:
    """Rows = domains + mean, columns = labels, values = perplexity (NaN where missing).

    The mean row is the arithmetic mean of the per-domain perplexities, as in the BTM paper;
    it is NaN for a column that lacks any of the domains, so means always cover the same set.
    """
    rows = frame[(frame["run_label"] == run_label) & (frame["split"] == split)
                 & frame["eval_domain"].isin(domains) & frame["label"].isin(labels)]
    table = rows.pivot(index="eval_domain", columns="label", values="ppl")
    table = table.reindex(index=domains, columns=labels)
    table.loc[MEAN_ROW] = table.mean(axis=0, skipna=False)
    table.index.name = "domain"
    table.columns.name = None
    return table.dropna(axis=1, how="all")


def summary_table(frame: pd.DataFrame, runs: list[RunData], split: str, group_key: str,
                  labels: list[str]) -> pd.DataFrame:
    """Rows = runs, columns = labels, values = mean perplexity over the run's domains of one
    group ("train", "eval", "other" or "all")."""
    out = {}
    for run in runs:
        present = sorted(frame.loc[(frame["run_label"] == run.label) & (frame["split"] == split),
                                   "eval_domain"].unique())
        groups, _ = domain_groups(run, present)
        group = next((g for g in groups if g.key == group_key), None)
        if group is None:
            continue
        out[run.label] = ppl_table(frame, run.label, split, group.domains, labels).loc[MEAN_ROW]
    table = pd.DataFrame(out).T.reindex(columns=labels) if out else pd.DataFrame(columns=labels)
    table.index.name = "run"
    return table.dropna(axis=1, how="all")


def compute_table(runs: list[RunData]) -> pd.DataFrame:
    """CPU, GPU and wall hours per (run, stage) from the records, plus a total per run.

    Baseline units (``dense``, ``random_split*``) get their own row ``<stage> (<unit>)`` so the
    forest's cost can be set against the compute-matched dense model. Hours are NaN where no
    record of the row had that measurement; ``source`` says where the numbers came from.
    """
    rows = []
    for run in runs:
        groups: dict[str, list[dict]] = {}
        for rec in run.records:
            baseline = _baseline_of(str(rec["unit"]))
            name = f"{rec['stage']} ({baseline})" if baseline else rec["stage"]
            groups.setdefault(name, []).append(rec)
        # Stages in the order they ran (their first start), so no list of stages lives here.
        for name in sorted(groups, key=lambda n: (_first_start(groups[n]), n)):
            rows.append(_compute_row(run.label, name, groups[name]))
        if groups:
            rows.append(_compute_row(run.label, "total", run.records))
    columns = ["run", "stage", "units", "wall_h", "cpu_h", "gpu_h", "source"]
    return pd.DataFrame(rows, columns=columns)


def _baseline_of(unit: str) -> str | None:
    """The baseline a unit belongs to: the dense LM, or an expert of the random-split forest."""
    if unit == DENSE:
        return DENSE
    if re.fullmatch(rf"{RANDOM_SPLIT_PREFIX}\d+", unit):
        return "random_split"
    return None


def _first_start(records: list[dict]) -> float:
    starts = [r["started_s"] for r in records if r.get("started_s") is not None]
    return min(starts) if starts else math.inf


def _compute_row(run_label: str, name: str, records: list[dict]) -> dict:
    def hours(key: str) -> float:
        known = [r[key] for r in records if r.get(key) is not None]
        return sum(known) / 3600.0 if known else float("nan")
    sources = sorted({r["_source"] for r in records})
    source = sources[0] if len(sources) == 1 else "mixed: " + ", ".join(
        f"{sum(r['_source'] == s for r in records)} {s}" for s in sources)
    return {"run": run_label, "stage": name, "units": len(records), "wall_h": hours("wall_s"),
            "cpu_h": hours("cpu_s"), "gpu_h": hours("gpu_s"), "source": source}


def check_split(frame: pd.DataFrame, split: str | None) -> str:
    """The split to tabulate: the one asked for, else ``test``, else ``valid``, else the most
    common split in the results."""
    splits = frame["split"].value_counts()
    if split is not None:
        if split not in splits.index:
            raise BtmError(f"--split {split!r} has no rows in the results (splits present: "
                           f"{', '.join(sorted(splits.index))})")
        return split
    for preferred in ("test", "valid"):
        if preferred in splits.index:
            return preferred
    return str(splits.index[0])


def group_means(frame: pd.DataFrame, runs: list[RunData], split: str) -> pd.DataFrame:
    """Mean perplexity per (run, label, domain group) over the group's domains.

    Only complete groups count: a label that lacks a domain of the group gets no mean there.
    Columns: run_label, label, method, k, n_clusters, seed_fraction, group, group_title, ppl.
    """
    rows = []
    for run in runs:
        sub = frame[(frame["run_label"] == run.label) & (frame["split"] == split)]
        if sub.empty:
            continue
        groups, _ = domain_groups(run, sorted(sub["eval_domain"].unique()))
        for label, rows_of_label in sub.groupby("label", sort=False):
            by_domain = rows_of_label.set_index("eval_domain")
            first = rows_of_label.iloc[0]
            for group in groups:
                if not all(d in by_domain.index for d in group.domains):
                    continue
                rows.append({"run_label": run.label, "label": label, "method": first["method"],
                             "k": first["k"], "n_clusters": first["n_clusters"],
                             "seed_fraction": first["seed_fraction"], "group": group.key,
                             "group_title": group.title,
                             "ppl": float(by_domain.loc[group.domains, "ppl"].mean())})
    return pd.DataFrame(rows, columns=["run_label", "label", "method", "k", "n_clusters",
                                       "seed_fraction", "group", "group_title", "ppl"])


# --------------------------------------------------------------------------- few-shot

def fewshot_frame(runs: list[RunData]) -> pd.DataFrame | None:
    """The few-shot rows of all runs with ``run_label``, a method ``label`` (as the perplexity
    tables label methods) and ``order_key``; None when no run has few-shot results."""
    frames = []
    for run in runs:
        if run.fewshot is None or run.fewshot.empty:
            continue
        df = run.fewshot.copy()
        df["run_label"] = run.label
        frames.append(df)
    if not frames:
        return None
    frame = pd.concat(frames, ignore_index=True)
    for col in ("k", "n_clusters"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float) if col in frame else np.nan
    frame["seed_fraction"] = np.nan
    frame["prior"] = frame["prior"].astype(str)
    frame["routing"] = frame["routing"].astype(str)
    frame["prior_variant"] = frame["prior"]
    frame["label"] = variant_labels(frame)
    frame["order_key"] = [_order_key(r) for r in frame.itertuples()]
    return frame


def fewshot_table(frame: pd.DataFrame, run_label: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """(mean over seeds, standard deviation over seeds, higher-is-better per row) for one run:
    rows = ``task metric`` (plus ``[filter]`` and ``N-shot`` where they are not the default /
    not the same for every row), columns = method labels in paper order."""
    rows = frame[frame["run_label"] == run_label].copy()
    shots_vary = rows["num_fewshot"].nunique() > 1
    rows["row"] = [f"{r.task} {r.metric}" + (f" [{r.filter}]" if r.filter != "none" else "")
                   + (f" {int(r.num_fewshot)}-shot" if shots_vary else "") for r in rows.itertuples()]
    labels = ordered_labels(rows)
    order = list(dict.fromkeys(rows.sort_values(["task", "metric", "filter", "num_fewshot"])["row"]))
    stats = rows.groupby(["row", "label"])["value"]
    mean = stats.mean().unstack("label").reindex(index=order, columns=labels)
    std = stats.std(ddof=1).unstack("label").reindex(index=order, columns=labels)
    seeds = rows.groupby(["row", "label"])["seed"].nunique().unstack("label").reindex(index=order, columns=labels)
    std = std.where(seeds > 1)  # one seed: no spread to show
    better = rows.drop_duplicates("row").set_index("row")["better"].reindex(order)
    higher = better.map(lambda b: str(b) != "lower")
    for t in (mean, std):
        t.index.name = "task metric"
        t.columns.name = None
    return mean, std, higher
