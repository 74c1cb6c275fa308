"""c-BTM on the SLURM test cluster: the data are binarized by an array of shard tasks, the
clusters are fitted in one job, the corpus is assigned by an array of assign tasks, and the
merged clusters train one expert each and are evaluated with cluster routing."""
from __future__ import annotations

import textwrap

import pandas as pd
import pytest

from conftest import run_btm
from test_pipeline_slurm import _record, _require_pipeline_parts, _wait_done


@pytest.mark.slurm
@pytest.mark.slow
def test_cbtm_assigns_its_corpus_in_an_array_on_slurm(slurm_cluster, small_corpus, tmp_path):
    _require_pipeline_parts()
    run_dir = tmp_path / "run"
    cfg = tmp_path / "cbtm-slurm.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: cbtm-slurm
        method: cbtm
        corpus: {{path: {small_corpus}, vocab_size: 500, shard_mb: 0.01, shard_tasks: 2}}
        domains: {{train: [bible, code_python, legal], eval: [bible, legal]}}
        clusters: {{k: 2, assign_tasks: 2}}
        model: {{preset: tiny}}
        budget: {{total_updates: 12, gpus: 1, seed_fraction: 0.5, save_interval_updates: 4}}
        evaluation: {{methods: [experts, cbtm_cluster], top_k: 2}}
        executor: slurm
        profile: slurm-test
        max_parallel: 3
        """))
    run_btm("run", cfg, "--run-dir", run_dir, check=True)
    _wait_done(slurm_cluster, run_dir, timeout=900)
    status = run_btm("status", run_dir, check=True).stdout
    assert "FAILED" not in status, status
    assigns = [_record(run_dir, f"cluster_assign.s{t}") for t in range(2)]
    assert all(a["slurm"]["slurm_array_job_id"] for a in assigns), assigns  # an array of 2 tasks
    assert len({a["slurm"]["slurm_array_job_id"] for a in assigns}) == 1
    fit, merged = _record(run_dir, "cluster_fit"), _record(run_dir, "cluster")
    assert all(fit["finished"] <= a["started"] and a["finished"] <= merged["started"] for a in assigns)
    assert merged["clusters"] == ["cluster_0", "cluster_1"]
    results = pd.read_csv(run_dir / "results" / "results.csv")
    routed = results[results["method"] == "cbtm_cluster"]
    assert set(routed["eval_domain"]) == {"bible", "legal"} and (routed["ppl"] > 1).all()
