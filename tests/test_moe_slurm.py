"""The moe stage on the SLURM test cluster: the tiny forest becomes a MoE in its own job after
merge, the job is requeued mid-training (as a preemption does) and resumes from its
checkpoint_last, and the MoE is scored and its routing filed."""
from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from conftest import run_btm
from test_pipeline_slurm import _ledger, _record, _require_pipeline_parts, _wait_done


def _moe_progress(run_dir: Path) -> int:
    log = run_dir / "moe" / "train_log.jsonl"
    if not (run_dir / "moe" / "checkpoint_last.pt").exists() or not log.exists():
        return 0
    ups = [json.loads(line).get("update", 0) for line in log.read_text().splitlines() if line.strip()]
    return max(ups, default=0)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(2400)  # the whole pipeline plus a requeue delay, on the shared 2-core machine
def test_moe_stage_on_slurm_resumes_after_requeue(slurm_cluster, small_corpus, tmp_path):
    _require_pipeline_parts()
    run_dir = tmp_path / "run"
    cfg = tmp_path / "moe-slurm.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: moe-slurm
        corpus: {{path: {small_corpus}, vocab_size: 500}}
        domains: {{train: [bible, code_python, legal], eval: [legal]}}
        model: {{preset: tiny}}
        budget: {{total_updates: 40, gpus: 1, seed_fraction: 0.25, save_interval_updates: 4}}
        evaluation: {{methods: [experts]}}
        moe: {{enabled: true, budget_share: 0.5, router_init: data, train: all}}
        executor: slurm
        profile: slurm-test
        max_parallel: 3
        """))
    r = run_btm("run", cfg, "--run-dir", run_dir, check=True)
    assert "MoE 20 updates on 1 GPUs" in r.stdout
    moe_job = next(row for row in _ledger(run_dir) if row["job"] == "moe")
    deadline = time.time() + 900
    while _moe_progress(run_dir) < 8:
        assert time.time() < deadline, "the moe job never got going"
        assert not (run_dir / "records" / "moe.json").exists(), "the moe job finished before the requeue"
        time.sleep(0.2)
    slurm_cluster.run(["scontrol", "requeue", moe_job["job_id"]])
    _wait_done(slurm_cluster, run_dir, timeout=1800)  # a requeued job waits out SLURM's requeue delay

    moe = _record(run_dir, "moe")
    assert int(moe["slurm"]["slurm_restart_count"]) >= 1
    assert moe["train"]["resumed"]["last_logged_update"] >= 8 and moe["train"]["num_updates"] == 20
    assert [e["name"] for e in moe["moe"]["experts"]] == ["bible", "code_python", "legal"]
    assert moe["started"] >= _record(run_dir, "merge")["finished"]
    results = (run_dir / "results" / "results.csv").read_text().splitlines()
    assert sum(1 for line in results if line.split(",")[1] == "moe") == 1  # legal
    assert (run_dir / "results" / "routing.csv").is_file()
    assert (run_dir / "results" / "inference.csv").is_file()
    assert "jobs to submit: 0" in run_btm("run", cfg, "--run-dir", run_dir, check=True).stdout
