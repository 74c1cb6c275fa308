"""Few-shot results in the tidy tables and in ``btm report`` (launcher/contract/results.py FEWSHOT,
analysis/tables.py fewshot_table, analysis/report.py). Synthetic values with known means and
spreads; the tables are written by the real ``launcher.contract.results.append_fewshot``."""
from __future__ import annotations

import statistics

import pandas as pd
import pytest

from analysis.report import build_report
from analysis_synth import make_run
from launcher.contract.errors import BtmError
from launcher.contract.results import FEWSHOT_KEY, append_fewshot, read_fewshot

SEEDS = [1, 2, 3]
# (task, metric, better) -> method label -> per-seed values
VALUES = {
    ("btm_fs_sst2", "acc", "higher"): {("dense", 1): [0.60, 0.62, 0.64], ("cbtm_cluster", 1): [0.70, 0.72, 0.77],
                                       ("cbtm_cluster", 4): [0.66, 0.68, 0.70]},
    ("btm_fs_ag_news", "acc", "higher"): {("dense", 1): [0.50, 0.55, 0.60], ("cbtm_cluster", 1): [0.40, 0.45, 0.47],
                                          ("cbtm_cluster", 4): [0.52, 0.52, 0.52]},
    ("btm_fs_ag_news", "word_perplexity", "lower"): {("dense", 1): [30.0, 31.0, 32.0],
                                                     ("cbtm_cluster", 1): [25.0, 26.0, 29.0],
                                                     ("cbtm_cluster", 4): [27.0, 27.0, 27.0]},
}


def fewshot_rows(run: str) -> list[dict]:
    rows = []
    for (task, metric, better), by_method in VALUES.items():
        for (method, k), values in by_method.items():
            for seed, value in zip(SEEDS, values):
                rows.append({"run": run, "task": task, "metric": metric, "filter": "none", "value": value,
                             "method": method, "k": k,
                             "routing": "none" if method == "dense" else "prompt:tfidf-svd(T=0.1)",
                             "prior": "none", "num_fewshot": 8, "seed": seed, "samples": 1000,
                             "expert_forward_passes": 1000 * k, "seconds": 60.0, "better": better,
                             "n_clusters": 8 if method == "cbtm_cluster" else None})
    return rows


def table_lines(md: str, heading_prefix: str) -> list[str]:
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(heading_prefix))
    out = []
    for ln in lines[start + 1:]:
        if ln.startswith("|"):
            out.append(ln)
        elif out:
            break
    return out


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_fewshot_table_is_tidy_typed_and_replaces_by_key(tmp_path):
    append_fewshot(tmp_path, fewshot_rows("r"))
    again = fewshot_rows("r")[:3]
    again[0]["value"] = 0.99
    table = append_fewshot(tmp_path, again)
    assert len(table) == 27 and not table.duplicated(subset=FEWSHOT_KEY).any()
    assert table["k"].dtype == "Int64" and table["value"].dtype == "float64"
    first = table[(table.task == "btm_fs_sst2") & (table.method == "dense") & (table.seed == 1)]
    assert first["value"].tolist() == [0.99]
    pd.testing.assert_frame_equal(read_fewshot(tmp_path / "results" / "fewshot.csv"),
                                  read_fewshot(tmp_path / "results" / "fewshot.parquet"))
    # the perplexity table is a different file and is left alone
    assert not (tmp_path / "results" / "results.csv").exists()


def test_fewshot_append_validates_only_the_new_rows(tmp_path, monkeypatch):
    """The few-shot table takes the same cheap append as results (a spy on the real validator):
    an existing fewshot.parquet that append_fewshot wrote is not validated again."""
    import launcher.contract.results as results

    append_fewshot(tmp_path, fewshot_rows("r"))
    seen = []
    real = results.validate_rows
    monkeypatch.setattr(results, "validate_rows", lambda rows, spec=None: seen.append(len(rows)) or real(rows, spec))
    table = append_fewshot(tmp_path, fewshot_rows("r2")[:1])
    assert seen == [1] and len(table) == 28 and table["run"].iloc[-1] == "r2"


def test_appending_to_a_foreign_fewshot_table_names_the_file_and_the_column(tmp_path):
    """A fewshot.parquet append_fewshot did not write (plain pandas dtypes) is validated in full."""
    (tmp_path / "results").mkdir()
    parquet = tmp_path / "results" / "fewshot.parquet"
    pd.DataFrame([{**fewshot_rows("r")[0], "better": "sideways"}]).to_parquet(parquet, index=False)
    before = parquet.read_bytes()
    with pytest.raises(BtmError, match=r"fewshot\.parquet: fewshot: column 'better' row 0 must be"):
        append_fewshot(tmp_path, fewshot_rows("r")[1:2])
    assert parquet.read_bytes() == before and not (tmp_path / "results" / "fewshot.csv").exists()


@pytest.mark.parametrize("bad, match", [
    (dict(method="cbtm_magic"), "fewshot: column 'method' row 0 has unknown method"),
    (dict(k=0), "fewshot: column 'k' must be >= 1"),
    (dict(value=float("nan")), "fewshot: column 'value' is empty"),
    (dict(better="sideways"), "column 'better' row 0 must be 'higher' or 'lower'"),
    (dict(task=None), "fewshot: column 'task' is empty in row 0"),
])
def test_bad_fewshot_rows_name_the_column(tmp_path, bad, match):
    row = {**fewshot_rows("r")[0], **bad}
    with pytest.raises(BtmError, match=match):
        append_fewshot(tmp_path, [row])


def test_report_shows_fewshot_means_spreads_and_best_per_row(tmp_path):
    run = make_run(tmp_path, "fs", records=False, priors=False)
    append_fewshot(run, fewshot_rows("fs"))
    md = build_report([run]).read_text()
    table = table_lines(md, "**Run fs** (3 seed(s))")
    header = cells(table[0])
    assert header == ["task metric", "Dense", "c-BTM 8 clusters top-1", "c-BTM 8 clusters top-4"]
    body = {cells(ln)[0]: cells(ln)[1:] for ln in table[2:]}
    assert list(body) == ["btm_fs_ag_news acc", "btm_fs_ag_news word_perplexity", "btm_fs_sst2 acc"]
    for (task, metric, better), by_method in VALUES.items():
        means = [statistics.mean(v) for v in by_method.values()]
        best = max(means) if better == "higher" else min(means)
        for got, mean in zip(body[f"{task} {metric}"], means):
            text = f"{mean:.4f}"
            assert got == (f"**{text}**" if round(mean, 4) == round(best, 4) else text), (task, metric)
    std = table_lines(md, "Standard deviation over seeds:")
    spread = {cells(ln)[0]: cells(ln)[1:] for ln in std[2:]}
    for (task, metric, _), by_method in VALUES.items():
        assert spread[f"{task} {metric}"] == [f"{statistics.stdev(v):.4f}" for v in by_method.values()]
    csv = pd.read_csv(run / "report" / "tables" / "fewshot.fs.csv", index_col=0)
    assert csv.loc["btm_fs_sst2 acc", "best"] == "c-BTM 8 clusters top-1"
    assert csv.loc["btm_fs_ag_news word_perplexity", "best"] == "c-BTM 8 clusters top-1"
    # the perplexity part of the report is unchanged
    assert "## Perplexity per domain" in md and md.index("## Few-shot tasks") < md.index("## Compute")


def test_report_without_fewshot_has_no_fewshot_section(tmp_path):
    run = make_run(tmp_path, "ppl", records=False, priors=False)
    assert "Few-shot" not in build_report([run]).read_text()


def test_report_of_a_fewshot_only_run(tmp_path):
    run = tmp_path / "only"
    append_fewshot(run, fewshot_rows("only"))
    md = build_report([run]).read_text()
    assert "few-shot harness results only" in md and "## Perplexity per domain" not in md
    assert table_lines(md, "**Run only**")[0].startswith("| task metric | Dense |")
