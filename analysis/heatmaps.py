"""Heatmaps of a report: the cached domain prior, expert removal (``btm forest ablate``) and a
MoE's routing. Same rules as ``analysis.plots``: each returns a Figure or raises PlotSkipped.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.plots import PlotSkipped
from analysis.results import RunData


def plot_prior_heatmap(run: RunData, domain_order: list[str] | None = None) -> Figure:
    """Heatmap of the cached domain prior p(expert | evaluation domain) from RUN/priors/.

    One panel per forest: prior files with the same ``forest`` key, expert set and settings.
    Where several files give the same domain of one panel, the newest file wins (older ones
    are stale caches of earlier checkpoints or settings).
    """
    if not run.priors:
        raise PlotSkipped(f"run {run.label} has no cached priors ({run.path / 'priors'}/*.json)")
    panels: dict[tuple, dict[str, dict]] = {}
    for p in run.priors:  # oldest first, so later files overwrite
        group = (p["forest"], tuple(sorted(p["experts"])), p["settings"])
        panels.setdefault(group, {})[p["eval_domain"]] = p
    varying = [i for i in range(3) if len({g[i] for g in panels}) > 1]
    fig = Figure(figsize=(1.0, 1.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    widest = 0.0
    tallest = 0.0
    for ax, (group, by_domain) in zip(axes, sorted(panels.items())):
        experts: list[str] = []
        for p in by_domain.values():
            experts += [e for e in p["experts"] if e not in experts]
        order = [d for d in (domain_order or []) if d in by_domain]
        domains = order + sorted(d for d in by_domain if d not in order)
        matrix = np.full((len(domains), len(experts)), np.nan)
        for i, d in enumerate(domains):
            for e, v in zip(by_domain[d]["experts"], by_domain[d]["prior"]):
                matrix[i, experts.index(e)] = v
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(1.0, np.nanmax(matrix)),
                          aspect="auto")
        ax.set_xticks(range(len(experts)), experts, rotation=40, ha="right")
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xlabel("expert")
        ax.set_ylabel("evaluation domain")
        what = {0: group[0], 1: f"{len(group[1])} experts", 2: group[2]}
        detail = "\n".join(textwrap.wrap("; ".join(what[i] for i in varying if what[i]), 40))
        ax.set_title(f"{run.label}: cached domain prior" + (f"\n({detail})" if detail else ""),
                     fontsize="medium")
        if matrix.size <= 200:
            for (i, j), v in np.ndenumerate(matrix):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.5 else "black")
        widest += 2.0 + 0.6 * len(experts)
        tallest = max(tallest, 2.0 + 0.45 * len(domains))
    fig.colorbar(image, ax=list(axes), label="prior probability p(expert | domain)")
    fig.set_size_inches(max(6.0, widest + 1.5), max(3.5, tallest))
    return fig


def plot_ablation_heatmap(table: pd.DataFrame, title: str = "expert removal") -> Figure:
    """Heatmap of ``btm forest ablate``'s table: rows = removed expert, columns = eval domain,
    cells = relative perplexity change (%) of the forest without that expert. A diverging map
    centred on 0, so a rise (red) on the expert's own domain stands out."""
    needed = {"removed", "eval_domain", "rel_ppl_change"}
    if table.empty or not needed <= set(table.columns):
        raise PlotSkipped(f"the ablation table needs rows with columns {', '.join(sorted(needed))}")
    matrix = table.pivot_table(index="removed", columns="eval_domain", values="rel_ppl_change",
                               aggfunc="mean", sort=False) * 100.0
    limit = max(float(np.nanmax(np.abs(matrix.to_numpy()))), 1e-9)
    fig = Figure(figsize=(max(4.5, 1.5 + 0.9 * matrix.shape[1]), max(3.0, 1.5 + 0.5 * matrix.shape[0])),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), list(matrix.columns), rotation=40, ha="right")
    ax.set_yticks(range(matrix.shape[0]), list(matrix.index))
    ax.set_xlabel("evaluation domain")
    ax.set_ylabel("expert removed")
    method = ", ".join(sorted(set(table["method"]))) if "method" in table else ""
    ax.set_title(f"{title}: perplexity change without the expert" + (f"\n({method})" if method else ""),
                 fontsize="medium")
    if matrix.size <= 400:
        for (i, j), v in np.ndenumerate(matrix.to_numpy()):
            if np.isfinite(v):
                ax.text(j, i, f"{v:+.1f}%", ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * limit else "black")
    fig.colorbar(image, ax=ax, label="relative perplexity change (%)")
    return fig


def plot_routing_heatmap(run: RunData, split: str) -> Figure:
    """Heatmap of a MoE's routing: per layer, the share of each evaluation domain's
    token-to-expert assignments that went to each expert slot (results/routing.*)."""
    table = run.routing
    if table is None or not (table["split"] == split).any():
        raise PlotSkipped(f"run {run.label} has no MoE routing statistics on the {split} split")
    table = table[table["split"] == split]
    layers = sorted(table["layer"].unique())
    fig = Figure(figsize=(1.0, 1.0), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers):
        matrix = table[table["layer"] == layer].pivot(index="eval_domain", columns="slot",
                                                      values="share")
        names = table[table["layer"] == layer].drop_duplicates("slot").set_index("slot")["expert"]
        image = ax.imshow(matrix.to_numpy(dtype=float), cmap="viridis", vmin=0.0, vmax=1.0,
                          aspect="auto")
        ax.set_xticks(range(matrix.shape[1]), [names[s] for s in matrix.columns], rotation=40,
                      ha="right")
        ax.set_yticks(range(matrix.shape[0]), list(matrix.index))
        ax.set_xlabel("expert slot (built from)")
        ax.set_ylabel("evaluation domain")
        ax.set_title(f"{run.label}: layer {layer}", fontsize="medium")
        if matrix.size <= 200:
            for (i, j), v in np.ndenumerate(matrix.to_numpy(dtype=float)):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.5 else "black")
    fig.colorbar(image, ax=list(axes), label="share of the domain's assignments")
    fig.set_size_inches(max(6.0, len(layers) * (2.0 + 0.6 * matrix.shape[1]) + 1.5),
                        max(3.5, 2.0 + 0.45 * matrix.shape[0]))
    return fig
