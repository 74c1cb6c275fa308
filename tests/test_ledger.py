"""A run's bookkeeping files through the real CLI: a missing job ledger, record or hash cache is
"nothing yet"; a corrupt ledger or record stops `btm status`, `btm cancel` and `btm run` with
an error naming the file and what to do, and changes nothing; a corrupt hash cache (derived
data) is rebuilt with a warning."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_btm
from launcher.config import load_config

CORRUPT = "[{\"job\": \"data\", \"job_id\": \"10"  # cut short: a copy interrupted, a disk hiccup


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A tiny run on the slurm executor, planned but not started (no scheduler, no records)."""
    corpus = tmp_path / "corpus"
    for domain in ("bible", "code_python", "legal"):
        (corpus / domain).mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("tiny", {"executor": "slurm", "profile": "slurm-test"}, corpus=corpus)
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


@pytest.fixture
def slurm_env(tmp_path) -> dict:
    """SLURM client commands that log their arguments; sbatch would hand out job ids."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "slurm_calls"
    for tool in ("sbatch", "srun", "squeue", "sacct", "scancel"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\n"
                                    + ("echo 'Submitted batch job 1001'\n" if tool == "sbatch" else ""))
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _calls(tmp_path) -> list[str]:
    path = tmp_path / "slurm_calls"
    return path.read_text().splitlines() if path.exists() else []


def _assert_refused(proc, path: Path, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "btm: error: " in proc.stderr and str(path) in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_no_ledger_yet_is_no_jobs(run_dir, slurm_env, tmp_path):
    status = run_btm("status", run_dir, env=slurm_env, check=True)
    assert "0/13 units done; scheduler state from records" in status.stdout
    cancel = run_btm("cancel", run_dir, env=slurm_env, check=True)
    assert "no submitted SLURM jobs to cancel" in cancel.stdout
    assert _calls(tmp_path) == []


@pytest.mark.parametrize("text", [CORRUPT, "{\"job\": \"data\"}", "[{\"job\": \"data\"}]"],
                         ids=["truncated", "not_a_list", "row_without_job_id"])
def test_corrupt_ledger_stops_status_cancel_and_run(run_dir, slurm_env, tmp_path, text):
    ledger = run_dir / "jobs" / "submissions.json"
    ledger.parent.mkdir()
    ledger.write_text(text)
    for verb in (["status", run_dir], ["cancel", run_dir], ["run", run_dir / "config.yaml", "--run-dir", run_dir]):
        _assert_refused(run_btm(*verb, env=slurm_env), ledger, "job ledger", "restore it", "scancel")
    # nothing was cancelled or submitted, and the only list of the run's jobs is untouched
    assert not any(c.startswith(("scancel", "sbatch")) for c in _calls(tmp_path)), _calls(tmp_path)
    assert ledger.read_text() == text
    assert not (run_dir / "jobs" / "submitit").exists()


def test_corrupt_record_stops_status_and_run(run_dir, slurm_env, tmp_path):
    record = run_dir / "records" / "data_plan.json"  # the first stage: the planner reads its record
    record.parent.mkdir()
    record.write_text("{\"stage\": \"data_plan\", \"outp")
    for verb in (["status", run_dir], ["run", run_dir / "config.yaml", "--run-dir", run_dir]):
        _assert_refused(run_btm(*verb, env=slurm_env), record, "completion record",
                        "delete it to run data_plan again")
    assert not any(c.startswith("sbatch") for c in _calls(tmp_path))
    assert not (run_dir / "jobs").exists()


def test_corrupt_hash_cache_is_rebuilt_with_a_warning(run_dir, slurm_env):
    cache = run_dir / "records" / ".hashes.json"
    cache.parent.mkdir()
    cache.write_text("{\"data/bible/train.bin\": [1, 2")
    status = run_btm("status", run_dir, env=slurm_env, check=True)
    assert f"btm: warning: hash cache {cache} cannot be read" in status.stderr
    assert "0/13 units done" in status.stdout
    assert json.loads(cache.read_text()) == {}  # replaced by the rebuilt (here: empty) cache
    assert "warning" not in run_btm("status", run_dir, env=slurm_env, check=True).stderr
