"""analysis.report / `btm report`: a report over several runs whose links all resolve, with
tables side by side, plots or a line saying why a plot is missing, and clear CLI errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from analysis.report import build_report
from analysis_synth import make_run
from conftest import run_btm
from launcher.contract.errors import BtmError


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = [make_run(root, "sf30", seed_fraction=0.3), make_run(root, "sf50", seed_fraction=0.5),
            make_run(root, "c4", cbtm_clusters=4, priors=False, records=False)]
    path = build_report(dirs, out=root / "out")
    return path, path.read_text(), dirs


def _links(md: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", md)


def test_every_link_points_to_a_file_that_exists(report):
    path, md, _ = report
    links = _links(md)
    assert len(links) > 30
    for link in links:
        assert (path.parent / link).is_file(), link
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {Path(i).name for i in images} >= {
        "ppl_by_domain.sf30.png", "prior_heatmap.sf30.png", "ppl_vs_topk.png",
        "ppl_vs_seed_fraction.png"}
    for image in images:
        assert (path.parent / image).read_bytes()[:4] == b"\x89PNG"


def test_report_holds_tables_of_every_run_and_a_side_by_side_summary(report):
    _, md, _ = report
    for run in ("sf30", "sf50", "c4"):
        assert f"### Run {run}" in md
    summary = md[md.index("## Mean perplexity per run"):md.index("## Single experts")]
    assert re.search(r"^\| sf30 \|", summary, re.M) and re.search(r"^\| sf50 \|", summary, re.M)
    assert "c-BTM 4 clusters top-1" in summary
    assert "**Training domains**" in md and "**Evaluation domains**" in md
    assert "| train (dense) | 1 |" in md  # compute, baseline on its own row
    assert "on the **test** split" in md


def test_missing_plots_say_why(report):
    _, md, _ = report
    assert re.search(r"### Domain prior, run c4\n\nOmitted: run c4 has no cached priors", md)
    assert re.search(r"### Perplexity vs\. number of clusters \(c-BTM\)\n\nOmitted: only "
                     r"n_clusters=4", md)
    assert "ppl_vs_clusters.png" not in md


def test_writes_leave_no_temporary_files(report):
    path, _, _ = report
    leftovers = [p for p in path.parent.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_default_output_is_the_first_runs_report_dir(tmp_path):
    run = make_run(tmp_path, "solo", records=False, priors=False)
    assert build_report([run]) == run / "report" / "report.md"
    assert (run / "report" / "tables" / "ppl_train.solo.tex").is_file()


def test_write_report_is_the_pipeline_stage_entry_point(tmp_path):
    """launcher/stages.py calls analysis.report.write_report(str(run_dir))."""
    from analysis.report import write_report
    run = make_run(tmp_path, "stage", config="launcher")
    path = write_report(str(run))
    assert path == run / "report" / "report.md"
    md = path.read_text()
    assert "**Training domains**" in md and "**Evaluation domains**" in md


def test_cli_writes_report(tmp_path):
    run = make_run(tmp_path, "cli", priors=False)
    ok = run_btm("report", run, "--out", tmp_path / "rep", "--split", "valid", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "report.md" in ok.stdout
    assert "on the **valid** split" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_reports_bad_input_as_one_error_line(tmp_path, capsys):
    """Same handler as the subprocess above, called in-process to keep the test fast."""
    from launcher.cli import main
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"btm: error: run directory {tmp_path / 'nope'} does not exist (or is not a directory)"

    run = make_run(tmp_path, "bad", priors=False, records=False)
    (run / "results" / "results.csv").write_text("run,method\nx,dense\n")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "results.csv: results: missing required column 'k'" in err and "Traceback" not in err
    assert not (run / "report").exists()  # nothing written on bad input


def test_unknown_split_is_an_error(tmp_path):
    run = make_run(tmp_path, "r", records=False, priors=False)
    with pytest.raises(BtmError, match="--split 'train' has no rows"):
        build_report([run], split="train")


def test_report_runs_without_torch_or_fairseq(tmp_path):
    """The whole report path imports only light packages (a login node has no torch)."""
    import subprocess
    import sys

    from conftest import REPO
    run = make_run(tmp_path, "light", records=False)
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'fairseq', 'fairseq_cli', 'sentencepiece'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from launcher.cli import main\n"
        f"sys.exit(main(['report', {str(run)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (run / "report" / "report.md").is_file()


def test_report_reads_tables_written_by_launcher_results(tmp_path):
    """Integration with the evaluation part: tables written by launcher.contract.results.append_results
    (nullable-typed parquet + csv, priors as fairseq_ext/priors.py writes them)."""
    import importlib.util

    from analysis_synth import result_rows, write_priors, write_records
    from conftest import require
    require(importlib.util.find_spec("launcher.contract.results") is not None,
            "launcher/contract/results.py (the evaluation part) is not merged into this checkout yet")
    from launcher.contract.results import append_results

    runs = []
    for fraction in (0.3, 0.6):
        run = tmp_path / f"sf{int(fraction * 10)}"
        rows = [{k: v for k, v in dict(r, seed_fraction=fraction).items() if v is not None}
                for r in result_rows(run.name, fraction)]
        append_results(run, rows[:20])
        append_results(run, rows[20:])
        write_records(run)
        write_priors(run, layout="fairseq_ext")
        runs.append(run)
    path = build_report(runs, out=tmp_path / "out")
    md = path.read_text()
    assert "results.parquet (60 rows)" in md
    assert "![Perplexity vs. seed fraction](plots/ppl_vs_seed_fraction.png)" in md
    assert "![Domain prior, run sf3](plots/prior_heatmap.sf3.png)" in md
    for link in _links(md):
        assert (path.parent / link).is_file(), link
