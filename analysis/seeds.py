"""Spread over seeds: runs whose configs differ only in ``seed`` are repeats of one experiment.

``btm run CONFIG --set seed=S --run-dir runs/NAME.seedS`` for several S gives run directories
whose resolved ``config.yaml`` (read by ``analysis.results.read_config``) are equal once
``seed`` and ``name`` are set aside. The seed is the training seed, and with it the data order
and the initialization (launcher/config.py). For such a group the report shows, per method and
domain and per domain group mean, the mean over the runs, their standard deviation (n - 1) and
their min and max, so a difference between methods can be read against the spread.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from analysis.results import RunData, safe_label
from analysis.tables import domain_groups, group_means

IGNORED_KEYS = ("seed", "name")  # what may differ between the runs of one group
SPREAD_COLUMNS = ["label", "row", "group", "n", "mean", "std", "min", "max"]


@dataclass
class SeedGroup:
    label: str              # for titles and file names
    runs: list[RunData]     # two or more, in the order given
    seeds: list             # their ``seed`` values

    @property
    def run_labels(self) -> list[str]:
        return [r.label for r in self.runs]


def seed_groups(runs: list[RunData]) -> tuple[list[SeedGroup], list[str]]:
    """(groups of two or more runs whose configs differ only in ``seed``, notes).

    A run without a config, or whose config has no ``seed``, is in no group. Runs with equal
    configs and equal seeds are repeats, not seeds: such a group is left out with a note."""
    buckets: dict[str, list[RunData]] = {}
    for run in runs:
        if not run.config or "seed" not in run.config:
            continue
        rest = {k: v for k, v in run.config.items() if k not in IGNORED_KEYS}
        buckets.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(run)
    groups, notes = [], []
    for members in buckets.values():
        if len(members) < 2:
            continue
        seeds = [m.config["seed"] for m in members]
        if len(set(map(str, seeds))) < len(seeds):
            notes.append(f"runs {', '.join(m.label for m in members)} have equal configs and repeat a "
                         f"seed ({', '.join(map(str, seeds))}): no spread over seeds is computed for them")
            continue
        names = {str(m.config.get("name") or m.label) for m in members}
        base = names.pop() if len(names) == 1 else members[0].label
        groups.append(SeedGroup(safe_label(f"{base}.seeds"), members, seeds))
    return groups, notes


def _agg(values: pd.core.groupby.SeriesGroupBy) -> pd.DataFrame:
    return values.agg(n="count", mean="mean", std="std", min="min", max="max").reset_index()


def seed_spread(frame: pd.DataFrame, group: SeedGroup, split: str) -> pd.DataFrame:
    """Tidy spread of perplexity over the group's runs: one row per (label, row, group) where
    ``row`` is a domain or ``mean`` (the mean over the domains of ``group``: train, eval...).
    Columns ``SPREAD_COLUMNS``; ``n`` is the number of runs with that value (std needs 2)."""
    sub = frame[frame["run_label"].isin(group.run_labels) & (frame["split"] == split)]
    if sub.empty:
        return pd.DataFrame(columns=SPREAD_COLUMNS)
    groups, _ = domain_groups(group.runs[0], sorted(sub["eval_domain"].unique()))
    group_of = {d: g.key for g in groups for d in g.domains}
    per_domain = _agg(sub.groupby(["label", "eval_domain"], sort=False)["ppl"]).rename(
        columns={"eval_domain": "row"})
    per_domain["group"] = per_domain["row"].map(group_of)
    means = group_means(frame, group.runs, split)
    per_group = _agg(means.groupby(["label", "group"], sort=False)["ppl"])
    per_group["row"] = "mean"
    return pd.concat([per_domain, per_group], ignore_index=True)[SPREAD_COLUMNS]


def spread_table(spread: pd.DataFrame, group_key: str, labels: list[str], runs: int) -> pd.DataFrame:
    """Rows = the group's domains + mean, columns = labels, cells ``mean ± std [min–max]``
    (only where all ``runs`` runs have the value; else ``mean (n of runs)``)."""
    sub = spread[spread["group"] == group_key]

    def cell(r) -> str:
        if r["n"] < runs:
            return f"{r['mean']:.2f} ({int(r['n'])} of {runs})"
        return f"{r['mean']:.2f} ± {r['std']:.2f} [{r['min']:.2f}–{r['max']:.2f}]"

    if sub.empty:
        return pd.DataFrame()
    table = sub.assign(cell=sub.apply(cell, axis=1)).pivot(index="row", columns="label", values="cell")
    rows = [r for r in dict.fromkeys(sub["row"]) if r != "mean"] + ["mean"]
    table = table.reindex(index=[r for r in rows if r in table.index],
                          columns=[c for c in labels if c in table.columns])
    table.index.name = None
    table.columns.name = None
    return table
