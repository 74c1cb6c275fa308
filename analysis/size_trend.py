"""The forest-minus-dense gap against model size (issue: does the gap move towards the paper's
direction as the model grows?).

Per run: its preset (``model.preset`` in config.yaml) and parameter count
(``launcher.contract.presets``, with ``corpus.vocab_size``), and for each ensemble method the
relative gap ``ppl_forest / ppl_dense - 1`` of the domain-group means (training and evaluation
domains apart; negative: the forest is better). Runs at one size (seeds) are averaged, with
their min and max as error bars. Only the eval stage's own prior rows count: the document
estimator without a temperature (``btm eval`` variants with ``block_end`` or ``T=`` in the
prior label are other experiments).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.plots import GROUP_TITLES, PlotSkipped, _colors
from analysis.results import RunData
from analysis.tables import group_means
from launcher.contract.errors import BtmError
from launcher.contract.presets import get_preset

FOREST_METHODS = ("ensemble_posterior", "ensemble_prior", "ensemble_uniform")
GAP_COLUMNS = ["method", "group", "preset", "params", "n", "mean", "min", "max"]


def _params(run: RunData) -> tuple[str, int] | None:
    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    corpus = run.config.get("corpus") if isinstance(run.config.get("corpus"), dict) else {}
    if "preset" not in model:
        return None
    try:
        preset = get_preset(str(model["preset"]))
    except BtmError:
        return None
    return preset.name, preset.approx_params(int(corpus.get("vocab_size", 4096)))


def size_gaps(frame: pd.DataFrame, runs: list[RunData], split: str) -> pd.DataFrame:
    """Columns ``GAP_COLUMNS``: per (method, domain group, preset) the mean, min and max over
    runs of the relative gap to the run's dense baseline, in %."""
    own = frame[~frame["prior"].astype(str).str.contains("block_end|,T=", regex=True)]
    rows = []
    for run in runs:
        size = _params(run)
        if size is None:
            continue
        means = group_means(own, [run], split)
        dense = means[means["method"] == "dense"].set_index("group")["ppl"]
        for r in means[means["method"].isin(FOREST_METHODS)].itertuples():
            if r.group in dense.index:
                rows.append({"method": r.method, "group": r.group, "preset": size[0], "params": size[1],
                             "gap": 100.0 * (r.ppl / dense[r.group] - 1.0)})
    if not rows:
        return pd.DataFrame(columns=GAP_COLUMNS)
    gaps = pd.DataFrame(rows).groupby(["method", "group", "preset", "params"], sort=False)["gap"]
    out = gaps.agg(n="count", mean="mean", min="min", max="max").reset_index()
    return out[GAP_COLUMNS].sort_values(["method", "group", "params"], ignore_index=True)


def plot_gap_vs_size(gaps: pd.DataFrame) -> Figure:
    """One panel per domain group: the gap (%) against parameters (log), a line per method."""
    if gaps.empty or gaps.groupby(["method", "group"])["params"].nunique().max() < 2:
        raise PlotSkipped("needs forest and dense results of runs at two or more model sizes "
                          "(model.preset in config.yaml)")
    panels = list(dict.fromkeys(gaps["group"]))
    fig = Figure(figsize=(5.0 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    methods = list(dict.fromkeys(gaps["method"]))
    for ax, group in zip(axes, panels):
        for method, color in zip(methods, _colors(len(methods))):
            rows = gaps[(gaps["group"] == group) & (gaps["method"] == method)]
            if rows.empty:
                continue
            err = np.vstack([rows["mean"] - rows["min"], rows["max"] - rows["mean"]])
            ax.errorbar(rows["params"], rows["mean"], yerr=err, marker="o", capsize=4, color=color,
                        label=method)
            for p, m, preset in zip(rows["params"], rows["mean"], rows["preset"]):
                ax.annotate(preset, (p, m), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0.0, color="gray", linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("forest vs dense perplexity (%, < 0: forest better)")
        ax.set_title(GROUP_TITLES.get(group, group), fontsize="medium")
        ax.legend(fontsize="small")
    fig.suptitle("forest-minus-dense gap against model size (bars: min–max over seeds)", fontsize="medium")
    return fig
