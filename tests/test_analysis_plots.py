"""analysis.plots: each figure shows the data it claims (titles, axis labels, plotted values),
PNGs are written, and plots without data are skipped with a reason instead of faked."""
from __future__ import annotations

import pandas as pd
import pytest

from analysis import heatmaps, plots, tables
from analysis.results import load_runs
from analysis_synth import EVAL, TRAIN, make_run, ppl_of, prior_of, result_rows


@pytest.fixture(scope="module")
def runs_and_frame(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = [make_run(root, "sf30", seed_fraction=0.3), make_run(root, "sf50", seed_fraction=0.5),
            make_run(root, "c4", cbtm_clusters=4, priors=False),
            make_run(root, "c8", cbtm_clusters=8, priors=False)]
    runs = load_runs(dirs)
    frame, _ = tables.combine(runs)
    return runs, frame


def test_domain_bars_show_every_method_and_domain(runs_and_frame, tmp_path):
    runs, frame = runs_and_frame
    run = runs[0]
    groups, _ = tables.domain_groups(run, TRAIN + EVAL)
    labels = tables.ordered_labels(frame)
    fig = plots.plot_domain_ppl(frame, run, "test", groups, labels)
    ax = fig.get_axes()[0]
    assert ax.get_title() == "sf30: perplexity per domain and method (test split)"
    assert ax.get_ylabel().startswith("perplexity (lower is better")
    assert ax.get_xlabel().startswith("evaluation domain")
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [f"{d} (T)" for d in TRAIN] + [f"{d} (E)" for d in EVAL]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == ["Dense", "Random split", "Ensemble uniform", "Ensemble prior"]
    # The bar of "Ensemble prior" over "legal" has the table's height.
    bars = ax.containers[legend.index("Ensemble prior")]
    assert bars[TRAIN.index("legal")].get_height() == pytest.approx(ppl_of("legal", "ensemble_prior", 0))
    path = plots.save_png(fig, tmp_path / "bars.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_prior_heatmap_is_domain_by_expert(runs_and_frame, tmp_path):
    runs, _ = runs_and_frame
    fig = heatmaps.plot_prior_heatmap(runs[0], TRAIN + EVAL)
    ax = fig.get_axes()[0]
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "evaluation domain"
    assert "cached domain prior" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == TRAIN + EVAL
    assert [t.get_text() for t in ax.get_xticklabels()] == TRAIN
    matrix = ax.get_images()[0].get_array()
    assert matrix.shape == (len(TRAIN + EVAL), len(TRAIN))
    assert list(matrix[(TRAIN + EVAL).index("quotes")]) == pytest.approx(prior_of("quotes"))
    assert fig.get_axes()[1].get_ylabel() == "prior probability p(expert | domain)"  # colorbar
    assert plots.save_png(fig, tmp_path / "h.png").stat().st_size > 10_000


def test_prior_files_as_fairseq_ext_writes_them_newest_wins(tmp_path):
    import json
    import os

    from analysis_synth import write_priors
    run_dir = make_run(tmp_path, "r", priors=False)
    write_priors(run_dir, layout="fairseq_ext")
    stale = run_dir / "priors" / "quotes.0000old.json"
    stale.write_text(json.dumps({"key": {"domain": "quotes", "experts": TRAIN,
                                         "settings": {"split": "valid", "alpha": 0.3,
                                                      "n_batches": None, "batch_docs": 2}},
                                 "prior": [0.0, 0.0, 1.0]}))
    os.utime(stale, (1_000_000, 1_000_000))  # older than the others
    # A second forest (random-split experts) gets its own panel.
    (run_dir / "priors" / "quotes.random.json").write_text(json.dumps(
        {"eval_domain": "quotes", "experts": ["rs0", "rs1"], "prior": [0.5, 0.5]}))
    (run_dir / "records" / ".hashes.json").write_text("{}")  # not a record
    run = load_runs([run_dir])[0]
    assert len(run.records) == 6
    fig = heatmaps.plot_prior_heatmap(run, TRAIN + EVAL)
    panels = [ax for ax in fig.get_axes() if ax.get_images()]
    assert len(panels) == 2
    forest = next(ax for ax in panels if len(ax.get_xticklabels()) == 3)
    assert "3 experts" in forest.get_title()
    assert [t.get_text() for t in forest.get_yticklabels()] == TRAIN + EVAL
    quotes = forest.get_images()[0].get_array()[(TRAIN + EVAL).index("quotes")]
    assert list(quotes) == pytest.approx(prior_of("quotes"))  # not the stale [0, 0, 1]


def test_ppl_vs_topk_has_one_point_per_k(runs_and_frame):
    runs, frame = runs_and_frame
    fig = plots.plot_ppl_vs_topk(frame, runs, "test")
    assert fig.get_suptitle() == "Perplexity vs. top-k (test split)"
    train_ax, eval_ax = fig.get_axes()
    assert train_ax.get_title() == "training domains" and eval_ax.get_title() == "evaluation domains"
    assert train_ax.get_xlabel().startswith("k (experts run per token")
    assert eval_ax.get_ylabel() == "mean perplexity over evaluation domains"
    # top-1, top-2 and the full ensemble of the cached prior at k = 3 experts.
    line = next(l for l in eval_ax.get_lines() if l.get_label() == "sf50")
    expected = [sum(ppl_of(d, "topk_prior", k, 0.5) for d in EVAL) / len(EVAL) for k in (1, 2)]
    expected.append(sum(ppl_of(d, "ensemble_prior", 3, 0.5) for d in EVAL) / len(EVAL))
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == pytest.approx(expected)
    full = next(l for l in eval_ax.get_lines() if l.get_label() == "sf50 full ensemble")
    assert list(full.get_xdata()) == [3] and full.get_marker() == "s"
    assert "sf50 dense" in [l.get_label() for l in eval_ax.get_lines()]


def test_ppl_vs_topk_with_one_k_per_run_uses_the_full_ensemble(tmp_path):
    """The launcher runs one top_k per config: top-1 plus the full ensemble is a curve."""
    rows = [r for r in result_rows("r") if not (r["method"] == "topk_prior" and r["k"] == 2)]
    run = make_run(tmp_path, "r")
    pd.DataFrame(rows).to_csv(run / "results" / "results.csv", index=False)
    runs = load_runs([run])
    frame, _ = tables.combine(runs)
    line = next(l for l in plots.plot_ppl_vs_topk(frame, runs, "test").get_axes()[0].get_lines()
                if l.get_label() == "r")
    assert list(line.get_xdata()) == [1, 3]


def test_ppl_vs_seed_fraction_across_runs(runs_and_frame):
    runs, frame = runs_and_frame
    fig = plots.plot_ppl_vs_seed_fraction(frame, runs, "test")
    assert fig.get_suptitle() == "Perplexity vs. seed fraction (test split)"
    eval_ax = fig.get_axes()[1]
    assert eval_ax.get_xlabel().startswith("seed fraction")
    line = next(l for l in eval_ax.get_lines() if l.get_label() == "Ensemble prior")
    assert list(line.get_xdata()) == [0.3, 0.5]
    assert line.get_ydata()[1] == pytest.approx(
        sum(ppl_of(d, "ensemble_prior", 0, 0.5) for d in EVAL) / len(EVAL))
    # c-BTM exists at one seed fraction only: no line for it.
    assert not any("c-BTM" in l.get_label() for l in eval_ax.get_lines())
    # Lines in paper order, and one colour per method across both panels (one legend).
    labels = [l.get_label() for l in eval_ax.get_lines()]
    assert labels[:4] == ["Dense", "Random split", "Ensemble uniform", "Ensemble prior"]
    train_ax = fig.get_axes()[0]
    for a, b in zip(train_ax.get_lines(), eval_ax.get_lines()):
        assert a.get_label() == b.get_label() and a.get_color() == b.get_color()


def test_ppl_vs_clusters_across_cbtm_runs(runs_and_frame, tmp_path):
    runs, frame = runs_and_frame
    fig = plots.plot_ppl_vs_clusters(frame, runs, "test")
    assert "number of clusters" in fig.get_suptitle()
    ax = fig.get_axes()[0]
    assert ax.get_xlabel() == "number of clusters (c-BTM experts)"
    assert ax.get_ylabel() == "mean perplexity over training domains"
    top1 = next(l for l in ax.get_lines() if l.get_label() == "c-BTM top-1")
    assert list(top1.get_xdata()) == [4, 8]
    assert top1.get_ydata()[1] == pytest.approx(
        sum(ppl_of(d, "cbtm_cluster", 1, 0.5, 8) for d in TRAIN) / len(TRAIN))
    assert any(l.get_label() == "dense (1 cluster)" for l in ax.get_lines())
    assert plots.save_png(fig, tmp_path / "c.png").stat().st_size > 10_000


def test_plots_without_data_are_skipped_with_a_reason(tmp_path):
    runs = load_runs([make_run(tmp_path, "only", priors=False, cbtm_clusters=4)])
    frame, _ = tables.combine(runs)
    with pytest.raises(plots.PlotSkipped, match="no cached priors"):
        heatmaps.plot_prior_heatmap(runs[0])
    with pytest.raises(plots.PlotSkipped, match="no topk_prior results"):
        plots.plot_ppl_vs_topk(frame, runs, "test")
    with pytest.raises(plots.PlotSkipped, match="only seed_fraction=0.5"):
        plots.plot_ppl_vs_seed_fraction(frame, runs, "test")
    with pytest.raises(plots.PlotSkipped, match="only n_clusters=4"):
        plots.plot_ppl_vs_clusters(frame, runs, "test")
