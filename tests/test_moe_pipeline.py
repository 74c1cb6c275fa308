"""The tiny pipeline with the moe stage on the local executor: the forest becomes a MoE
(router from data, posterior weights), the MoE trains for its share of the budget, is scored
beside the forest, its routing and its speed against one expert land in results/routing.* and
results/inference.* and in the report; `btm moe` runs
the same unit and resumes from its checkpoint_last."""
from __future__ import annotations

import json

import pytest

from conftest import require_fairseq, run_btm, write_small_corpus

pytestmark = pytest.mark.fairseq

MOE = ["--set", "moe.enabled=true", "--set", "moe.budget_share=0.25", "--set", "moe.router_init=data",
       "--set", "moe.weights=posterior", "--set", "moe.train=router"]


def test_tiny_forest_becomes_a_trained_moe_evaluated_and_reported(tmp_path):
    require_fairseq()
    from launcher.contract.moe_tables import INFERENCE, ROUTING
    from launcher.contract.results import read_results

    corpus = write_small_corpus(tmp_path / "corpus", ["bible", "code_python", "legal"],
                                {"train": 60, "valid": 8, "test": 8})
    run_dir = tmp_path / "run"
    r = run_btm("run", "tiny", "--run-dir", run_dir, "--corpus", corpus, "--no-progress", *MOE,
                timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MoE 6 updates on 1 GPUs" in r.stdout and "3 experts x 6 updates" in r.stdout
    record = json.loads((run_dir / "records" / "moe.json").read_text())
    assert record["train"]["num_updates"] == 6
    assert [e["name"] for e in record["moe"]["experts"]] == ["bible", "code_python", "legal"]
    assert record["moe"]["router_init"] == "data" and record["moe"]["top_k"] == 2
    weights = [e["weight"] for e in record["moe"]["experts"]]
    assert abs(sum(weights) - 1) < 1e-9 and len(set(weights)) == 3  # posterior, not uniform

    results = (run_dir / "results" / "results.csv").read_text()
    moe_rows = [line for line in results.splitlines() if line.split(",")[1] == "moe"]
    assert len(moe_rows) == 3 and all(line.split(",")[2] == "2" for line in moe_rows)  # k = top_k
    routing = read_results(run_dir / "results", ROUTING)
    assert len(routing) == 3 * 2 * 3  # domains x layers x slots
    sums = routing.groupby(["eval_domain", "layer"])["share"].sum()
    assert ((sums - 1).abs() < 1e-9).all()
    speed = read_results(run_dir / "results", INFERENCE).set_index("model")
    assert list(speed.index) == ["expert:bible", "moe", "ensemble"] and set(speed["split"]) == {"test"}
    assert speed.loc["expert:bible", "ratio_to_expert"] == 1.0 and speed.loc["ensemble", "models_run"] == 3
    report = (run_dir / "report" / "report.md").read_text()
    assert "## MoE routing" in report and "MoE (BTX)" in report
    assert "## MoE inference speed" in report and "| run: moe |" in report
    assert (run_dir / "report" / "tables" / "inference.csv").is_file()
    assert (run_dir / "report" / "plots" / "routing_heatmap.run.png").is_file()

    # `btm moe` is the stage's unit: done, then (record removed) resumed from checkpoint_last.
    assert "already done" in run_btm("moe", run_dir, check=True).stdout
    init_mtime = (run_dir / "moe" / "init.pt").stat().st_mtime_ns
    (run_dir / "records" / "moe.json").unlink()
    run_btm("moe", run_dir, check=True, timeout=600)
    again = json.loads((run_dir / "records" / "moe.json").read_text())
    assert again["train"]["resumed"]["checkpoint_last_existed"] and again["train"]["num_updates"] == 6
    assert again["moe"] == record["moe"]
    assert (run_dir / "moe" / "init.pt").stat().st_mtime_ns == init_mtime  # not rebuilt
    dry = json.loads(run_btm("moe", run_dir, "--dry-run", check=True).stdout)
    assert dry["budget"]["updates"] == 6 and dry["params"]["router_init"] == "data"
    # `btm eval --model moe=...` scores it as the stage does (k = top_k, slots named by the record)
    r = run_btm("eval", run_dir, "--methods", "experts", "--split", "valid", "--model",
                f"moe={run_dir / 'moe' / 'checkpoint_last.pt'}", check=True, timeout=600)
    assert any(line.split()[:2] == ["moe", "2"] for line in r.stdout.splitlines())
    valid = read_results(run_dir / "results", ROUTING)
    assert set(valid["split"]) == {"test", "valid"} and set(valid["expert"]) == {"bible", "code_python", "legal"}


def test_btm_moe_refuses_a_run_without_the_moe_section(tmp_path):
    from conftest import REPO

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((REPO / "launcher" / "configs" / "tiny.yaml").read_text())
    r = run_btm("moe", run_dir)
    assert r.returncode == 2 and "moe.enabled is false" in r.stderr
