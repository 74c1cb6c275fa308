"""PNG plots of a report, drawn with matplotlib's object API (no pyplot, no global state).

Each ``plot_*`` function returns a ``matplotlib.figure.Figure`` (tests read its titles and axis
labels) or raises ``PlotSkipped`` saying which data it lacks; ``save_png`` writes a figure
atomically. Nothing is drawn from made-up values: a plot without its data is skipped.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must happen before anything draws
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from analysis.results import RunData  # noqa: E402
from launcher.contract.methods import is_expert_method, table_order  # noqa: E402
from analysis.tables import DomainGroup, group_means  # noqa: E402
from launcher.contract.atomic import atomic_path  # noqa: E402

GROUP_TITLES = {"train": "training domains", "eval": "evaluation domains",
                "other": "other domains", "all": "all domains"}


class PlotSkipped(Exception):
    """A plot lacks the data it needs; the message says which (it goes into the report)."""


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# --------------------------------------------------------------------------- per run

def plot_domain_ppl(frame: pd.DataFrame, run: RunData, split: str, groups: list[DomainGroup],
                    labels: list[str]) -> Figure:
    """Grouped bars: one group per domain (training domains first), one bar per method."""
    rows = frame[(frame["run_label"] == run.label) & (frame["split"] == split)
                 & frame["label"].isin(labels)]
    domains = [d for g in groups for d in g.domains]
    table = rows.pivot(index="eval_domain", columns="label", values="ppl")
    table = table.reindex(index=domains, columns=labels).dropna(axis=1, how="all")
    if table.empty or table.notna().sum().sum() == 0:
        raise PlotSkipped(f"run {run.label} has no method results on the {split} split")
    n_dom, n_lab = table.shape
    width = 0.8 / n_lab
    fig = Figure(figsize=(max(7.0, 1.0 + n_dom * (0.25 * n_lab + 0.4)), 4.8))
    ax = fig.subplots()
    x = np.arange(n_dom)
    for i, (label, color) in enumerate(zip(table.columns, _colors(n_lab))):
        ax.bar(x + (i - (n_lab - 1) / 2) * width, table[label].to_numpy(), width, label=label,
               color=color)
    ax.set_xticks(x, [_domain_tick(d, groups) for d in domains], rotation=30, ha="right")
    values = table.to_numpy()[np.isfinite(table.to_numpy())]
    log = values.max() / values.min() > 8
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("perplexity (lower is better" + (", log scale)" if log else ")"))
    ax.set_xlabel("evaluation domain" + (" (T = training domain, E = evaluation domain)"
                                         if any(g.key in ("train", "eval") for g in groups) else ""))
    ax.set_title(f"{run.label}: perplexity per domain and method ({split} split)")
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _domain_tick(domain: str, groups: list[DomainGroup]) -> str:
    for g in groups:
        if domain in g.domains and g.key in ("train", "eval"):
            return f"{domain} ({'T' if g.key == 'train' else 'E'})"
    return domain


def plot_learning_curves(curves: pd.DataFrame, title: str) -> Figure:
    """Validation loss against updates (left) and training tokens (right), one line per model
    of the run (analysis/curves.py): the seed solid black, the dense baseline dashed, experts
    in colour."""
    if curves.empty:
        raise PlotSkipped("no train_log.jsonl with validation rows under seed/, experts/ or dense/")
    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    models = list(dict.fromkeys(curves["model"]))
    colors = dict(zip(models, _colors(len(models))))
    for ax, x, xlabel in ((axes[0], "update", "updates"), (axes[1], "tokens", "training tokens")):
        for model in models:
            rows = curves[curves["model"] == model].dropna(subset=[x]).sort_values(x)
            if rows.empty:
                continue
            kind = rows["kind"].iloc[0]
            style = {"seed": dict(color="black", linestyle="-"), "dense": dict(color="gray", linestyle="--")}
            ax.plot(rows[x], rows["valid_loss"], marker=".", label=model,
                    **style.get(kind, dict(color=colors[model], linestyle="-")))
        ax.set_xlabel(xlabel + ("" if x == "update" else " (from the job records)"))
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(True, alpha=0.3)
    if curves["tokens"].isna().all():
        axes[1].text(0.5, 0.5, "no job records with tokens", ha="center", va="center",
                     transform=axes[1].transAxes)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{title}: learning curves (experts count their own updates after branching)",
                 fontsize="medium")
    return fig


def plot_seed_spread(spread: pd.DataFrame, title: str, labels: list[str]) -> Figure:
    """Mean perplexity over the seeds of one experiment per domain group (a panel each), one bar
    per method, error bars from the min to the max over the seeds (analysis/seeds.py)."""
    means = spread[(spread["row"] == "mean") & (spread["n"] >= 2)]
    if means.empty:
        raise PlotSkipped("no method has a domain-group mean in two or more seeds")
    panels = list(dict.fromkeys(means["group"]))
    fig = Figure(figsize=(max(6.0, 1.2 + 0.5 * len(labels) * len(panels)), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, group in zip(axes, panels):
        rows = means[means["group"] == group].set_index("label")
        shown = [label for label in labels if label in rows.index]
        rows = rows.loc[shown]
        x = np.arange(len(shown))
        err = np.vstack([rows["mean"] - rows["min"], rows["max"] - rows["mean"]])
        ax.bar(x, rows["mean"], color=_colors(len(shown)), yerr=err, capsize=4)
        ax.set_xticks(x, shown, rotation=40, ha="right", fontsize="small")
        ax.set_ylabel("mean perplexity (bars: min–max over seeds)")
        ax.set_title(GROUP_TITLES.get(group, group), fontsize="medium")
        low = float((rows["min"]).min())
        ax.set_ylim(bottom=max(0.0, low - 0.1 * (float(rows["max"].max()) - low + 1e-9) - 0.02 * low))
    n = int(means["n"].max())
    fig.suptitle(f"{title}: mean over {n} seeds", fontsize="medium")
    return fig


# --------------------------------------------------------------------------- across runs

def _panels(means: pd.DataFrame, x: str, what: str) -> list[str]:
    """Domain groups (one panel each) in which ``x`` takes two or more values."""
    order = ["train", "eval", "other", "all"]
    panels = [g for g in order if means.loc[means["group"] == g, x].nunique() >= 2]
    if not panels:
        raise PlotSkipped(f"no domain group (training/evaluation domains) has {what} for two or "
                          f"more values of {x} (runs differ in their domain roles or coverage)")
    return panels


def _finish(fig: Figure, title: str, legend_title: str) -> None:
    """Overall title above the panels; one legend right of them (the panel with most lines)."""
    fig.suptitle(title)
    axes = fig.get_axes()
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda h: len(h[0]))
    if handles:
        fig.legend(handles, labels, title=legend_title, loc="upper left", fontsize="small",
                   bbox_to_anchor=(1.0, 0.9))
    fig.tight_layout()


def _panel_axes(fig: Figure, panels: list[str]):
    return fig.subplots(1, len(panels), squeeze=False)[0]


def plot_ppl_vs_topk(frame: pd.DataFrame, runs: list[RunData], split: str) -> Figure:
    """Mean perplexity of the cached-prior ensemble against k, the experts it runs per token:
    ``topk_prior`` rows, and the full ``ensemble_prior`` at its k (the forest size; a square
    marker). One line per run; the run's dense model dotted for reference."""
    means = group_means(frame, runs, split)
    curve = means[means["method"].isin(["topk_prior", "ensemble_prior"])].dropna(subset=["k"])
    if not (curve["method"] == "topk_prior").any():
        raise PlotSkipped(f"no topk_prior results on the {split} split")
    ks = sorted(curve["k"].unique())
    if len(ks) < 2:
        raise PlotSkipped(f"top-k and full-ensemble results exist only for k={ks[0]:g}; a curve "
                          "needs two or more k")
    panels = _panels(curve, "k", "top-k results")
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    run_colors = dict(zip([r.label for r in runs], _colors(len(runs))))
    for ax, group in zip(_panel_axes(fig, panels), panels):
        sub = curve[curve["group"] == group]
        line_of = _strip(sub, r"^(Top-\S+ prior|Ensemble prior)")
        for (run_label, line), pts in sub.groupby(["run_label", line_of]):
            pts = pts.sort_values("k")
            color = run_colors[run_label]
            ax.plot(pts["k"], pts["ppl"], marker="o", color=color, label=f"{run_label} {line}".strip())
            full = pts[pts["method"] == "ensemble_prior"]
            ax.plot(full["k"], full["ppl"], marker="s", markersize=9, linestyle="none",
                    color=color, label=f"{run_label} {line} full ensemble".replace("  ", " "))
        for run_label in sub["run_label"].unique():
            dense = means[(means["run_label"] == run_label) & (means["group"] == group)
                          & (means["method"] == "dense")]
            if len(dense) == 1:
                ax.axhline(dense["ppl"].iloc[0], linestyle=":", color=run_colors[run_label],
                           label=f"{run_label} dense")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [f"{k:g}" for k in ks])
        ax.set_xlabel("k (experts run per token, top-k by cached prior)")
        ax.set_ylabel(f"mean perplexity over {GROUP_TITLES[group]}")
        ax.set_title(GROUP_TITLES[group])
        ax.grid(alpha=0.3)
    _finish(fig, f"Perplexity vs. top-k ({split} split)", "run")
    return fig


CLUSTERS_PART = r"\d+(\.\d+)? clusters"


def _line_colors(rows: pd.DataFrame, line_of: pd.Series) -> dict[str, tuple]:
    """One colour per line, the same in every panel; lines in the paper's method order."""
    first: dict[str, tuple] = {}
    for line, method in zip(line_of, rows["method"]):
        first.setdefault(line, (table_order(method), line))
    ordered = sorted(first, key=first.get)
    return dict(zip(ordered, _colors(len(ordered))))


def _strip(rows: pd.DataFrame, pattern: str) -> pd.Series:
    """The label with the plotted variable's part removed: what tells the lines apart."""
    return rows["label"].map(lambda s: re.sub(pattern, "", s).replace("  ", " ").strip())


def plot_ppl_vs_seed_fraction(frame: pd.DataFrame, runs: list[RunData], split: str) -> Figure:
    """Mean perplexity against the seed LM's share of the training budget, across runs (or
    within one table with a ``seed_fraction`` column); one line per method."""
    means = group_means(frame, runs, split)
    means = means[~means["method"].map(is_expert_method)].dropna(subset=["seed_fraction"])
    fractions = sorted(means["seed_fraction"].unique())
    if len(fractions) < 2:
        found = f"only seed_fraction={fractions[0]:g}" if fractions else "no seed_fraction"
        raise PlotSkipped(f"{found} in the results columns or config.yaml of the runs; "
                          "a curve needs runs with two or more seed fractions")
    panels = _panels(means, "seed_fraction", "results")
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    colors = _line_colors(means, _strip(means, r" seed=\S+"))
    for ax, group in zip(_panel_axes(fig, panels), panels):
        sub = means[means["group"] == group]
        line_of = _strip(sub, r" seed=\S+")
        for line, color in colors.items():
            pts = sub[line_of == line].groupby("seed_fraction")["ppl"].mean()
            if len(pts) > 1:
                ax.plot(pts.index, pts.to_numpy(), marker="o", color=color, label=line)
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.set_xlabel("seed fraction (share of training updates spent on the seed LM)")
        ax.set_ylabel(f"mean perplexity over {GROUP_TITLES[group]}")
        ax.set_title(GROUP_TITLES[group])
        ax.grid(alpha=0.3)
    _finish(fig, f"Perplexity vs. seed fraction ({split} split)", "method")
    return fig


def plot_ppl_vs_clusters(frame: pd.DataFrame, runs: list[RunData], split: str) -> Figure:
    """c-BTM: mean perplexity against the number of clusters, one line per routing top-k;
    the dense model (one cluster, averaged over the runs) as a dotted reference."""
    means = group_means(frame, runs, split)
    cbtm = means[means["method"] == "cbtm_cluster"].dropna(subset=["n_clusters"])
    counts = sorted(cbtm["n_clusters"].unique())
    if len(counts) < 2:
        found = f"only n_clusters={counts[0]:g}" if counts else "no cbtm_cluster rows with n_clusters"
        raise PlotSkipped(f"{found} on the {split} split; a curve needs c-BTM results for two "
                          "or more cluster counts (n_clusters column or config.yaml)")
    panels = _panels(cbtm, "n_clusters", "c-BTM results")
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    colors = _line_colors(cbtm, _strip(cbtm, CLUSTERS_PART))
    for ax, group in zip(_panel_axes(fig, panels), panels):
        sub = cbtm[cbtm["group"] == group]
        line_of = _strip(sub, CLUSTERS_PART)
        for line, color in colors.items():
            pts = sub[line_of == line].groupby("n_clusters")["ppl"].mean()
            if len(pts):
                ax.plot(pts.index, pts.to_numpy(), marker="o", color=color, label=line)
        dense = means[(means["method"] == "dense") & (means["group"] == group)
                      & means["run_label"].isin(sub["run_label"])]
        if not dense.empty:
            ax.axhline(dense["ppl"].mean(), linestyle=":", color="gray", label="dense (1 cluster)")
        if min(counts) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [f"{c:g}" for c in counts])
        ax.set_xlabel("number of clusters (c-BTM experts)")
        ax.set_ylabel(f"mean perplexity over {GROUP_TITLES[group]}")
        ax.set_title(GROUP_TITLES[group])
        ax.grid(alpha=0.3)
    _finish(fig, f"c-BTM perplexity vs. number of clusters ({split} split)", "routing")
    return fig

