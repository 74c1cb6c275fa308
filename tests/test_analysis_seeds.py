"""Spread over seeds in `btm report` (analysis/seeds.py) on synthetic run directories."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from analysis import seeds, tables
from analysis.results import load_runs
from analysis_synth import BASE, FACTORS, make_run
from conftest import run_btm

FACTOR_OF_SEED = {1: 0.99, 2: 1.00, 3: 1.01}


def _seeded_run(root, name, seed, *, total_updates=200):
    """A synthetic run whose perplexities are scaled by FACTOR_OF_SEED[seed], config with ``seed``."""
    run = make_run(root, name, config="launcher")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.update(seed=seed, name="f1")
    cfg["budget"]["total_updates"] = total_updates
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    results = pd.read_csv(run / "results" / "results.csv")
    results["ppl"] = results["ppl"] * FACTOR_OF_SEED[seed]
    results["nll"] = results["ppl"].map(math.log)
    results.to_csv(run / "results" / "results.csv", index=False)
    return run


@pytest.fixture
def runs(tmp_path):
    dirs = [_seeded_run(tmp_path, f"f1.seed{s}", s) for s in (1, 2, 3)]
    dirs.append(_seeded_run(tmp_path, "longer.seed1", 1, total_updates=400))  # another experiment
    return dirs


def test_runs_that_differ_only_in_seed_are_grouped_and_their_spread_is_exact(runs):
    loaded = load_runs(runs)
    groups, notes = seeds.seed_groups(loaded)
    assert [g.run_labels for g in groups] == [["f1.seed1", "f1.seed2", "f1.seed3"]] and not notes
    assert groups[0].label == "f1.seeds" and groups[0].seeds == [1, 2, 3]
    frame, _ = tables.combine(loaded)
    spread = seeds.seed_spread(frame, groups[0], "test")
    label = frame.loc[frame["method"] == "ensemble_prior", "label"].iloc[0]
    row = spread[(spread["label"] == label) & (spread["row"] == "bible")].iloc[0]
    x = BASE["bible"] * FACTORS["ensemble_prior"]
    assert row["n"] == 3
    assert row["mean"] == pytest.approx(x, rel=1e-9)
    assert row["min"] == pytest.approx(0.99 * x, rel=1e-9) and row["max"] == pytest.approx(1.01 * x, rel=1e-9)
    assert row["std"] == pytest.approx(0.01 * x, rel=1e-6)  # sample std of (-0.01x, 0, +0.01x)
    # The group mean over the training domains, and its spread across the seeds.
    train = spread[(spread["label"] == label) & (spread["row"] == "mean") & (spread["group"] == "train")].iloc[0]
    m = sum(BASE[d] for d in ("bible", "code_python", "legal")) / 3 * FACTORS["ensemble_prior"]
    assert train["mean"] == pytest.approx(m, rel=1e-6) and train["std"] == pytest.approx(0.01 * m, rel=1e-6)
    table = seeds.spread_table(spread, "train", tables.ordered_labels(frame), 3)
    assert table.loc["bible", label] == f"{x:.2f} ± {0.01 * x:.2f} [{0.99 * x:.2f}–{1.01 * x:.2f}]"
    assert list(table.index) == ["bible", "code_python", "legal", "mean"]


def test_equal_seeds_are_not_a_spread(tmp_path):
    dirs = [_seeded_run(tmp_path, "a", 1), _seeded_run(tmp_path, "b", 1)]
    groups, notes = seeds.seed_groups(load_runs(dirs))
    assert groups == [] and "repeat a seed (1, 1)" in notes[0]


def test_report_shows_the_spread_table_and_error_bar_plot(runs, tmp_path):
    out = tmp_path / "report"
    run_btm("report", *runs, "--out", out, check=True)
    md = (out / "report.md").read_text()
    assert "## Spread over seeds" in md
    assert "### f1.seeds: runs f1.seed1, f1.seed2, f1.seed3 (seeds 1, 2, 3)" in md
    x = BASE["legal"] * FACTORS["dense"]
    assert f"{x:.2f} ± {0.01 * x:.2f} [{0.99 * x:.2f}–{1.01 * x:.2f}]" in md
    assert (out / "plots" / "seeds.f1.seeds.png").stat().st_size > 0
    tidy = pd.read_csv(out / "tables" / "seeds.f1.seeds.csv")
    assert set(tidy["n"]) == {3} and "longer" not in md.split("## Spread over seeds")[1].split("##")[0]


def test_gap_to_dense_against_model_size_over_seeds(tmp_path):
    from analysis import size_trend

    dirs = [_seeded_run(tmp_path, f"f1.seed{s}", s) for s in (1, 2, 3)]
    for s in (1, 2):  # the small preset: the forest 20% better than dense on every domain
        run = _seeded_run(tmp_path, f"f1.small.seed{s}", s)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["model"] = {"preset": "small"}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        results = pd.read_csv(run / "results" / "results.csv")
        forest = results["method"] == "ensemble_prior"
        dense = results[results["method"] == "dense"].set_index(["eval_domain", "split"])["ppl"]
        results.loc[forest, "ppl"] = [0.8 * dense[(d, sp)] for d, sp in
                                      zip(results.loc[forest, "eval_domain"], results.loc[forest, "split"])]
        results["nll"] = results["ppl"].map(math.log)
        results.to_csv(run / "results" / "results.csv", index=False)
        dirs.append(run)
    for run in dirs[:3]:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["model"] = {"preset": "tiny"}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_runs(dirs)
    frame, _ = tables.combine(loaded)
    gaps = size_trend.size_gaps(frame, loaded, "test")
    prior = gaps[gaps["method"] == "ensemble_prior"].set_index(["group", "preset"])
    # tiny: ensemble_prior / dense = 0.90 / 1.00 in every seed (both scale with the seed).
    assert prior.loc[("train", "tiny"), "n"] == 3
    assert prior.loc[("train", "tiny"), "mean"] == pytest.approx(-10.0, abs=1e-6)
    assert prior.loc[("eval", "small"), "mean"] == pytest.approx(-20.0, abs=1e-6)
    assert prior.loc[("eval", "small"), "params"] > 10 * prior.loc[("eval", "tiny"), "params"]
    fig = size_trend.plot_gap_vs_size(gaps)
    assert len(fig.axes) == 2
