import json, time
from pathlib import Path
import test_pipeline_slurm as T

def test_scratch(slurm_cluster, small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "_require_pipeline_parts", lambda: None)
    orig = T._wait_done
    def wait(cluster, run_dir, timeout):
        orig(cluster, run_dir, timeout)
        print(T.run_btm("status", run_dir).stdout, flush=True)
    monkeypatch.setattr(T, "_wait_done", wait)
    T.test_scancel_and_requeue_resume_from_checkpoints(slurm_cluster, small_corpus, tmp_path)
