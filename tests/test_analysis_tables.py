"""analysis.results + analysis.tables on synthetic runs: values land in the right cells, means,
best marks, LaTeX structure, compute hours from records, and clear errors on bad input."""
from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest

from analysis import render, tables
from analysis.results import load_run, load_runs
from analysis_synth import (BASE, EVAL, PRIOR, SACCT_RECORDS, TRAIN, make_run, ppl_of,
                            result_rows)
from launcher.contract.errors import BtmError


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(tmp_path, "sf30", seed_fraction=0.3)
    b = make_run(tmp_path, "sf50", seed_fraction=0.5, fmt="parquet")
    runs = load_runs([a, b])
    frame, notes = tables.combine(runs)
    return runs, frame, notes


def _train_table(runs, frame, run_index=0):
    labels = tables.ordered_labels(frame)
    return tables.ppl_table(frame, runs[run_index].label, "test", TRAIN, labels)


def test_config_roles_and_numbers_are_read_from_nested_config(two_runs):
    runs, _, notes = two_runs
    assert runs[0].train_domains == TRAIN and runs[0].eval_domains == EVAL
    assert runs[0].seed_fraction == 0.3 and runs[1].seed_fraction == 0.5
    assert runs[1].results_file.name == "results.parquet"
    assert notes == []


def test_launcher_config_layout(tmp_path):
    """launcher/config.py: domains.train / domains.eval (which may repeat training domains),
    budget.seed_fraction, clusters.k (a cluster count only when method is cbtm)."""
    btm = load_run(make_run(tmp_path, "btm", config="launcher", seed_fraction=0.4))
    assert btm.train_domains == TRAIN and btm.eval_domains == EVAL  # held-out ones only
    assert btm.seed_fraction == 0.4 and btm.n_clusters is None
    cbtm = load_run(make_run(tmp_path, "cbtm", config="launcher", cbtm_clusters=2))
    assert cbtm.n_clusters == 2
    (tmp_path / "btm" / "config.yaml").write_text(
        "domains: {train: [bible, legal], eval: [bible, legal]}\n")
    demo = load_run(tmp_path / "btm")
    assert demo.train_domains == ["bible", "legal"] and demo.eval_domains == []
    groups, _ = tables.domain_groups(demo, ["bible", "legal"])
    assert [g.key for g in groups] == ["train"]
    (tmp_path / "btm" / "config.yaml").write_text("domains: {train: bible}\n")
    with pytest.raises(BtmError, match=r"config\.yaml: key domains\.train must be a list"):
        load_run(tmp_path / "btm")


def test_ppl_table_cells_mean_row_and_column_order(two_runs):
    runs, frame, _ = two_runs
    t = _train_table(runs, frame)
    assert list(t.index) == TRAIN + ["mean"]
    # Paper order: dense, random split, ensembles, top-k by k, averages.
    assert list(t.columns) == ["Dense", "Random split", "Ensemble uniform", "Ensemble prior",
                               "Top-1 prior", "Top-2 prior", "Avg uniform", "Avg argmax",
                               "Avg posterior"]
    assert t.at["legal", "Dense"] == pytest.approx(ppl_of("legal", "dense", 0))
    assert t.at["bible", "Top-2 prior"] == pytest.approx(ppl_of("bible", "topk_prior", 2))
    assert t.at["code_python", "Avg argmax"] == pytest.approx(BASE["code_python"] * 1.10)
    for col in t.columns:
        assert t.at["mean", col] == pytest.approx(t.loc[TRAIN, col].mean())
    # Evaluation domains depend on the seed fraction: the two runs' tables differ there.
    labels = tables.ordered_labels(frame)
    e0 = tables.ppl_table(frame, runs[0].label, "test", EVAL, labels)
    e1 = tables.ppl_table(frame, runs[1].label, "test", EVAL, labels)
    assert e0.at["quotes", "Dense"] == pytest.approx(ppl_of("quotes", "dense", 0, 0.3))
    assert e1.at["quotes", "Dense"] == pytest.approx(ppl_of("quotes", "dense", 0, 0.5))


def test_mean_is_empty_for_a_method_missing_a_domain(tmp_path):
    rows = [r for r in result_rows("r") if not (r["method"] == "dense" and r["eval_domain"] == "legal")]
    run = make_run(tmp_path, "r")
    pd.DataFrame(rows).to_csv(run / "results" / "results.csv", index=False)
    runs = load_runs([run])
    frame, _ = tables.combine(runs)
    t = _train_table(runs, frame)
    assert math.isnan(t.at["legal", "Dense"]) and math.isnan(t.at["mean", "Dense"])
    assert not math.isnan(t.at["mean", "Ensemble prior"])
    assert "| mean | – |" in render.to_markdown(t)


def test_markdown_marks_the_best_value_of_each_row_in_bold(two_runs):
    runs, frame, _ = two_runs
    md = render.to_markdown(_train_table(runs, frame))
    lines = md.strip().splitlines()
    assert lines[0].startswith("| domain | Dense |")
    assert re.fullmatch(r"\|---\|(---:\|){9}", lines[1])
    for line in lines[2:]:
        bold = re.findall(r"\*\*([0-9.]+)\*\*", line)
        assert len(bold) == 1, line
        cells = line.strip("|").split("|")
        assert cells[4].strip().startswith("**")  # column 4 = Ensemble prior, the best
    bible = next(l for l in lines if l.startswith("| bible"))
    assert f"**{ppl_of('bible', 'ensemble_prior', 0):.2f}**" in bible


def test_latex_is_a_booktabs_tabular_with_one_column_per_method(two_runs):
    runs, frame, _ = two_runs
    t = _train_table(runs, frame)
    tex = render.to_latex(t, caption="training domains")
    assert tex.count("\\begin{tabular}") == 1 and tex.count("\\end{tabular}") == 1
    spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", tex).group(1)
    assert spec == "l" + "r" * len(t.columns)
    body = [l for l in tex.splitlines() if l.endswith("\\\\")]
    assert len(body) == 1 + len(t.index)  # header + domains + mean
    for line in body:
        assert line.count(" & ") == len(t.columns)
    assert "code\\_python" in tex and "code_python" not in tex.replace("code\\_python", "")
    assert tex.count("\\textbf{") == len(t.index)
    assert f"\\textbf{{{t.at['mean', 'Ensemble prior']:.2f}}}" in tex
    lines = tex.splitlines()
    assert lines[lines.index(next(l for l in lines if l.startswith("mean"))) - 1] == "\\midrule"
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")


def test_csv_keeps_values_and_names_the_best_column(two_runs):
    runs, frame, _ = two_runs
    t = _train_table(runs, frame)
    back = pd.read_csv(pd.io.common.StringIO(render.to_csv(t)), index_col=0)
    assert list(back["best"]) == ["Ensemble prior"] * len(t.index)
    assert back.at["bible", "Top-1 prior"] == pytest.approx(t.at["bible", "Top-1 prior"])


def test_summary_compares_runs_side_by_side(two_runs):
    runs, frame, _ = two_runs
    labels = tables.ordered_labels(frame)
    s = tables.summary_table(frame, runs, "test", "eval", labels)
    assert list(s.index) == ["sf30", "sf50"]
    expected = sum(ppl_of(d, "ensemble_prior", 0, 0.5) for d in EVAL) / len(EVAL)
    assert s.at["sf50", "Ensemble prior"] == pytest.approx(expected)
    assert s.at["sf30", "Ensemble prior"] > s.at["sf50", "Ensemble prior"]


def test_experts_are_kept_out_of_method_columns(two_runs):
    _, frame, _ = two_runs
    assert not any(l.startswith("Expert") for l in tables.ordered_labels(frame))
    assert tables.ordered_labels(frame, experts=True) == [f"Expert {d}" for d in TRAIN]


def test_variant_fields_appear_in_labels_only_when_they_vary(tmp_path):
    extra = [dict(r, prior="uniform-prior") for r in result_rows("r")
             if r["method"] == "ensemble_prior"]
    runs = load_runs([make_run(tmp_path, "r", extra_rows=extra),
                      make_run(tmp_path, "c8", cbtm_clusters=8)])
    frame, notes = tables.combine(runs)
    labels = tables.ordered_labels(frame)
    assert f"Ensemble prior [prior={PRIOR}]" in labels
    assert "Ensemble prior [prior=uniform-prior]" in labels
    assert "Dense" in labels  # nothing varies for dense
    assert "c-BTM 8 clusters top-1" in labels and "c-BTM 8 clusters top-2" in labels
    assert notes == []


def test_per_target_averages_form_one_column(two_runs):
    """average_posterior rows carry ',target=<domain>' in prior: still one column."""
    runs, frame, _ = two_runs
    assert frame.loc[frame["method"] == "average_posterior", "prior"].nunique() == len(TRAIN + EVAL)
    t = _train_table(runs, frame)
    assert "Avg posterior" in t.columns and "Avg argmax" in t.columns
    assert t.at["legal", "Avg posterior"] == pytest.approx(ppl_of("legal", "average_posterior", 3))
    assert not t["Avg posterior"].isna().any()


def test_per_target_averages_with_varying_k_form_one_column(tmp_path):
    """A posterior average's k is how many experts its target's prior keeps (one-hot on a
    training domain, several on an unseen one): a consequence of the target, not a variant."""
    run = make_run(tmp_path, "r")
    table = run / "results" / "results.csv"
    df = pd.read_csv(table)
    avg = df["method"] == "average_posterior"
    df.loc[avg, "k"] = [1 if d in TRAIN else 3 for d in df.loc[avg, "eval_domain"]]
    df.to_csv(table, index=False)
    runs = load_runs([run])
    frame, _ = tables.combine(runs)
    t = _train_table(runs, frame)
    assert "Avg posterior" in t.columns and not any(c.startswith("Avg posterior k=") for c in t.columns)
    assert not t["Avg posterior"].isna().any()  # the mean row covers every domain


def test_repeated_rows_keep_the_last_and_say_so(tmp_path):
    again = [dict(r, ppl=99.0, nll=math.log(99.0)) for r in result_rows("r")
             if r["method"] == "dense" and r["eval_domain"] == "bible"]
    runs = load_runs([make_run(tmp_path, "r", extra_rows=again)])
    frame, notes = tables.combine(runs)
    assert _train_table(runs, frame).at["bible", "Dense"] == 99.0
    assert len(notes) == 1 and "Dense" in notes[0] and "last" in notes[0]


def test_runs_without_config_get_one_domain_group(tmp_path):
    runs = load_runs([make_run(tmp_path, "bare", config=False)])
    assert runs[0].train_domains is None
    assert any("config.yaml not found" in n for n in runs[0].notes)
    groups, _ = tables.domain_groups(runs[0], sorted(TRAIN + EVAL))
    assert [g.key for g in groups] == ["all"] and groups[0].domains == sorted(TRAIN + EVAL)


def test_same_directory_name_twice_gets_distinct_labels(tmp_path):
    a = make_run(tmp_path / "x", "run")
    b = make_run(tmp_path / "y", "run")
    assert [r.label for r in load_runs([a, b])] == ["x_run", "y_run"]


def test_split_choice():
    frame = pd.DataFrame({"split": ["valid", "test", "test"]})
    assert tables.check_split(frame, None) == "test"
    assert tables.check_split(frame, "valid") == "valid"
    with pytest.raises(BtmError, match="--split 'train' has no rows.*test, valid"):
        tables.check_split(frame, "train")


def test_unknown_methods_and_inconsistent_nll_are_refused_naming_the_file(tmp_path):
    """The report reads the table through launcher.contract.results, the one validator."""
    extra = [dict(r, method="ensemble_magic") for r in result_rows("r") if r["method"] == "dense"]
    with pytest.raises(BtmError, match=r"results\.csv: .*unknown method 'ensemble_magic'"):
        load_runs([make_run(tmp_path, "r", extra_rows=extra)])
    extra = [dict(r) for r in result_rows("s") if r["method"] == "dense"][:1]
    extra[0]["ppl"] = extra[0]["ppl"] * 2
    extra[0]["eval_domain"] = "elsewhere"
    with pytest.raises(BtmError, match=r"results\.csv: .*column 'ppl' row \d+ is .* but exp\(nll\)"):
        load_runs([make_run(tmp_path, "s", extra_rows=extra)])


def test_k_is_required_in_every_row(tmp_path):
    run = make_run(tmp_path, "r")
    csv = run / "results" / "results.csv"
    df = pd.read_csv(csv)
    df["k"] = df["k"].astype(object)
    df.loc[df["method"] == "dense", "k"] = None
    df.to_csv(csv, index=False)
    with pytest.raises(BtmError, match=r"results\.csv: results: column 'k' is empty in row \d+"):
        load_run(run)
    df.loc[df["method"] == "dense", "k"] = 1
    df.loc[0, "k"] = "three"
    df.to_csv(csv, index=False)
    with pytest.raises(BtmError, match=r"results\.csv: results: column 'k' must be a number; row 0 has 'three'"):
        load_run(run)


# --------------------------------------------------------------------------- compute hours

def test_compute_hours_are_summed_per_stage_from_records(two_runs):
    runs, _, _ = two_runs
    t = tables.compute_table(runs[:1]).set_index("stage")
    experts = [v for k, v in SACCT_RECORDS.items() if k.startswith("train.") and k != "train.dense"]
    assert t.at["train", "units"] == 3
    assert t.at["train", "gpu_h"] == pytest.approx(sum(v["gpu_s"] for v in experts) / 3600)
    assert t.at["train", "cpu_h"] == pytest.approx(sum(v["cpu_s"] for v in experts) / 3600)
    assert t.at["train (dense)", "gpu_h"] == pytest.approx(6.0)
    assert t.at["seed", "wall_h"] == pytest.approx(1.0)
    # The eval record has no sacct: wall time from finished - started, no CPU/GPU hours.
    assert t.at["eval", "wall_h"] == pytest.approx(0.5)
    assert math.isnan(t.at["eval", "gpu_h"]) and t.at["eval", "source"] == "local wall clock"
    all_gpu = sum(v["gpu_s"] for v in SACCT_RECORDS.values()) / 3600
    assert t.at["total", "gpu_h"] == pytest.approx(all_gpu)
    assert t.at["total", "wall_h"] == pytest.approx(
        sum(v["elapsed_s"] for v in SACCT_RECORDS.values()) / 3600 + 0.5)
    assert t.at["total", "units"] == len(SACCT_RECORDS) + 1
    assert list(t.index) == ["seed", "train", "train (dense)", "eval", "total"]


def test_compute_table_has_a_run_column_for_several_runs(two_runs):
    runs, _, _ = two_runs
    t = tables.compute_table(runs)
    assert set(t["run"]) == {"sf30", "sf50"}
    assert list(t[t["stage"] == "total"]["gpu_h"]) == pytest.approx([15.0, 15.0])


# --------------------------------------------------------------------------- bad input

def test_unknown_run_directory(tmp_path):
    with pytest.raises(BtmError, match=f"run directory {tmp_path / 'nope'} does not exist"):
        load_run(tmp_path / "nope")


def test_missing_results_table(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(BtmError, match="no results table in .*results.*results.parquet or results.csv"):
        load_run(tmp_path / "r")


def test_missing_column_is_named_with_the_file(tmp_path):
    run = make_run(tmp_path, "r")
    csv = run / "results" / "results.csv"
    pd.read_csv(csv).drop(columns=["ppl", "tokens"]).to_csv(csv, index=False)
    with pytest.raises(BtmError, match=r"results\.csv: results: missing required column 'tokens'"):
        load_run(run)


def test_empty_table(tmp_path):
    run = make_run(tmp_path, "r")
    csv = run / "results" / "results.csv"
    pd.read_csv(csv).iloc[:0].to_csv(csv, index=False)
    with pytest.raises(BtmError, match=r"results\.csv: no results rows"):
        load_run(run)
    csv.write_text("")
    with pytest.raises(BtmError, match=r"could not read results table .*results\.csv"):
        load_run(run)


def test_non_numeric_value_names_row_and_column(tmp_path):
    run = make_run(tmp_path, "r")
    csv = run / "results" / "results.csv"
    df = pd.read_csv(csv)
    df["ppl"] = df["ppl"].astype(object)
    df.loc[3, "ppl"] = "oops"
    df.to_csv(csv, index=False)
    with pytest.raises(BtmError, match=r"results\.csv: results: column 'ppl' must be a number; row 3 has 'oops'"):
        load_run(run)


def test_bad_record_and_prior_files_are_named(tmp_path):
    run = make_run(tmp_path, "r")
    (run / "records" / "seed.json").write_text("{not json")
    with pytest.raises(BtmError, match=r"cannot parse .*records/seed\.json"):
        load_run(run)
    (run / "records" / "seed.json").write_text(json.dumps({"stage": "seed", "sacct": {"gpu_s": "x"}}))
    with pytest.raises(BtmError, match=r"seed\.json: key sacct\.gpu_s must be a number"):
        load_run(run)
    (run / "records" / "seed.json").write_text(json.dumps({"stage": "seed", "started": "yesterday",
                                                          "finished": 5}))
    with pytest.raises(BtmError, match=r"seed\.json: key started must be an ISO-8601"):
        load_run(run)
    (run / "records" / "seed.json").unlink()
    (run / "priors" / "forest.bible.json").write_text(json.dumps(
        {"eval_domain": "bible", "experts": ["a", "b"], "prior": [1.0]}))
    with pytest.raises(BtmError, match=r"forest\.bible\.json: experts and prior must be lists of the same length"):
        load_run(run)


def test_bad_config_is_named(tmp_path):
    run = make_run(tmp_path, "r")
    (run / "config.yaml").write_text("train_domains: bible\n")
    with pytest.raises(BtmError, match=r"config\.yaml: key train_domains must be a list"):
        load_run(run)
