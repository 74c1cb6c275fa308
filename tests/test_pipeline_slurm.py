"""The SLURM executor: sbatch calls per run (fake sbatch), and on the real test cluster the tiny
pipeline end to end, a no-op second run, and an expert resumed after scancel and requeue."""
from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import require, require_fairseq, run_btm

FAKE_SBATCH = textwrap.dedent("""\
    #!{python}
    # A stand-in for sbatch: keeps a copy of each script, answers like sbatch does.
    import os, shutil, sys
    from pathlib import Path
    d = Path(os.environ["FAKE_SLURM_DIR"])
    d.mkdir(exist_ok=True)
    n = 1000 + len(list(d.glob("*.sh"))) + 1
    shutil.copy([a for a in sys.argv[1:] if not a.startswith("-")][-1], d / f"{{n}}.sh")
    print(f"Submitted batch job {{n}}")
""")


def fake_slurm_env(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH.format(python=sys.executable))
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    for tool in ("squeue", "sacct"):  # "no jobs": the run is not active
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path / "sbatch")}


def experts_config(tmp_path: Path, n: int) -> Path:
    corpus = tmp_path / "corpus"
    names = [f"d{i}" for i in range(n)]
    for d in names:
        (corpus / d).mkdir(parents=True)
    cfg = tmp_path / f"n{n}.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: n{n}
        corpus: {{path: {corpus}}}
        domains: {{train: [{", ".join(names)}], eval: [{names[0]}]}}
        model: {{preset: tiny}}
        baselines: [dense]
        executor: slurm
        profile: slurm-test
        max_parallel: 3
        """))
    return cfg


@pytest.mark.parametrize("n", [2, 8])
def test_one_sbatch_per_stage_whatever_the_number_of_experts(tmp_path, n):
    env = fake_slurm_env(tmp_path)
    run_dir = tmp_path / "run"
    r = run_btm("run", experts_config(tmp_path, n), "--run-dir", run_dir, env=env, check=True)
    scripts = sorted((tmp_path / "sbatch").glob("*.sh"))
    # data_plan data_shard data seed train dense merge score eval report: not a function of n
    assert len(scripts) == 10
    assert "submitted 10 jobs" in r.stdout
    ledger = json.loads((run_dir / "jobs" / "submissions.json").read_text())
    ids = {row["job"]: row["job_id"] for row in ledger}
    text = {row["job"]: (tmp_path / "sbatch" / f"{row['job_id']}.sh").read_text() for row in ledger}
    assert f"#SBATCH --array=0-{n - 1}%{min(n, 3)}" in text["train"]
    assert f"#SBATCH --dependency=afterok:{ids['seed']}" in text["train"]
    assert f"#SBATCH --dependency=afterany:{ids['train']}" in text["merge"]
    assert f"--dependency=afterok:{ids['merge']}:{ids['dense']}" in text["score"]
    for t in text.values():
        assert "#SBATCH --kill-on-invalid-dep=yes" in t and "#SBATCH --requeue" in t
        assert "#SBATCH --signal=B:USR2@30" in t
    assert json.loads((run_dir / "jobs" / "train.units.json").read_text()) == [f"d{i}" for i in range(n)]
    # each array task's payload names its unit (submitit pickles one argv list per task)
    pickles = sorted((run_dir / "jobs" / "submitit").glob(f"{ids['train']}_*_submitted.pkl"))
    assert len(pickles) == n


def test_status_and_cancel_use_the_ledger(tmp_path):
    env = fake_slurm_env(tmp_path)
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    (bin_dir / "scancel").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scancel.args\n")
    (bin_dir / "scancel").chmod(0o755)
    # sacct answers for the train array: task 0 done, task 1 still PENDING (slurmdbd lags the
    # controller), while squeue already shows task 1 RUNNING: status takes the live state.
    (bin_dir / "sacct").write_text("#!/bin/sh\necho '1005_0|n2.train|COMPLETED|0:0|95|01:30.250|cpu=1|node1'\n"
                                   "echo '1005_1|n2.train|PENDING|0:0|0|00:00:00||None assigned'\n")
    run_dir = tmp_path / "run"
    run_btm("run", experts_config(tmp_path, 2), "--run-dir", run_dir, env=env, check=True)
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '1005_1|n2.train|RUNNING|0:10|node2|None'\n")
    out = run_btm("status", run_dir, env=env, check=True).stdout
    rows = {tuple(line.split()[:3]): line.split() for line in out.splitlines()[1:] if line.strip()}
    assert rows[("train", "train", "d0")][4:6] == ["COMPLETED", "1005_0"]
    assert rows[("train", "train", "d1")][4:8] == ["RUNNING", "1005_1", "0:00:10", "node2"]
    assert "from squeue (queued jobs) and sacct (finished ones)" in out
    r = run_btm("cancel", run_dir, env=env, check=True)
    assert "cancelled 10 job(s)" in r.stdout
    assert (tmp_path / "scancel.args").read_text().split() == [str(i) for i in range(1001, 1011)]


def test_check_uses_sbatch_test_only(tmp_path):
    env = fake_slurm_env(tmp_path)
    r = run_btm("run", experts_config(tmp_path, 2), "--run-dir", tmp_path / "run", "--check", env=env)
    assert r.returncode == 0, r.stderr
    assert "train: ok" in r.stdout and not (tmp_path / "run").exists()


# ---- the real SLURM test cluster -----------------------------------------------------------

def _require_pipeline_parts():
    require_fairseq()
    import importlib.util

    for mod in ("fairseq_ext.data_prep", "fairseq_ext.train", "fairseq_ext.branch", "fairseq_ext.scoring",
                "fairseq_ext.evaluate", "analysis.report"):
        require(importlib.util.find_spec(mod) is not None, f"{mod} is not on this branch yet")


def _ledger(run_dir: Path) -> list[dict]:
    p = run_dir / "jobs" / "submissions.json"
    return json.loads(p.read_text()) if p.exists() else []


def _wait_done(cluster, run_dir: Path, timeout: float) -> None:
    ids = ",".join(sorted({row["job_id"] for row in _ledger(run_dir)}))
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = cluster.run(["squeue", "-h", "-j", ids, "-o", "%i %T"], check=False).stdout.strip()
        if not out:
            return
        time.sleep(2)
    raise AssertionError(f"jobs of {run_dir} still queued after {timeout}s:\n{out}")


def _record(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "records" / f"{name}.json").read_text())


def _tiny_config(tmp_path: Path, corpus: Path, **budget) -> Path:
    b = {"total_updates": 24, "gpus": 1, "seed_fraction": 0.5, "save_interval_updates": 4, **budget}
    cfg = tmp_path / "tiny-slurm.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: tiny-slurm
        corpus: {{path: {corpus}, vocab_size: 500, shard_mb: 0.01, shard_tasks: 2}}
        domains: {{train: [bible, code_python, legal], eval: [bible, legal]}}
        model: {{preset: tiny}}
        budget: {json.dumps(b)}
        evaluation: {{methods: [experts, ensemble_uniform, ensemble_posterior]}}
        executor: slurm
        profile: slurm-test
        max_parallel: 3
        """))
    return cfg


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_pipeline_on_slurm(slurm_cluster, small_corpus, tmp_path):
    _require_pipeline_parts()
    run_dir = tmp_path / "run"
    cfg = _tiny_config(tmp_path, small_corpus)
    r = run_btm("run", cfg, "--run-dir", run_dir, check=True)
    assert "submitted 9 jobs" in r.stdout
    _wait_done(slurm_cluster, run_dir, timeout=900)
    status = run_btm("status", run_dir, check=True).stdout
    assert "14/14 units done" in status and "sacct" in status, status  # (squeue: only while queued)
    shards = [_record(run_dir, f"data_shard.t{k}") for k in range(2)]  # the data in shards, an array of 2
    assert all(s["shards"] > 0 and s["slurm"]["slurm_array_job_id"] for s in shards), shards
    seed, merge = _record(run_dir, "seed"), _record(run_dir, "merge")
    trains = [_record(run_dir, f"train.{e}") for e in ("bible", "code_python", "legal")]
    for t in trains:  # dependencies held: every expert started after the seed finished
        assert t["started"] >= seed["finished"] and merge["started"] >= t["finished"]
        assert t["slurm"]["slurm_array_job_id"] and t["sacct"]["elapsed_s"] is not None
    nodes = {t["slurm"]["slurm_job_nodelist"] for t in trains}
    assert len(nodes) >= 2, nodes  # array tasks spread over the cluster's nodes
    assert (run_dir / "results" / "results.csv").is_file()
    n_ledger = len(_ledger(run_dir))
    again = run_btm("run", cfg, "--run-dir", run_dir, check=True)
    assert "jobs to submit: 0" in again.stdout and len(_ledger(run_dir)) == n_ledger


def _progress(run_dir: Path, expert: str) -> int:
    log = run_dir / "experts" / expert / "train_log.jsonl"
    if not (run_dir / "experts" / expert / "checkpoint_last.pt").exists() or not log.exists():
        return 0
    ups = [json.loads(line).get("update", 0) for line in log.read_text().splitlines() if line.strip()]
    return max(ups, default=0)


@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_and_requeue_resume_from_checkpoints(slurm_cluster, small_corpus, tmp_path):
    _require_pipeline_parts()
    run_dir = tmp_path / "run"
    cfg = _tiny_config(tmp_path, small_corpus, total_updates=100, seed_fraction=0.2, save_interval_updates=10)
    run_btm("run", cfg, "--run-dir", run_dir, check=True)
    train = next(row for row in _ledger(run_dir) if row["job"] == "train")
    task = {u: f"{train['job_id']}_{i}" for i, u in enumerate(train["units"])}
    deadline = time.time() + 600
    while min(_progress(run_dir, "bible"), _progress(run_dir, "legal")) < 20:
        assert time.time() < deadline, "experts never got going"
        time.sleep(0.5)
    slurm_cluster.run(["scancel", task["bible"]])
    slurm_cluster.run(["scontrol", "requeue", task["legal"]])
    _wait_done(slurm_cluster, run_dir, timeout=900)  # a requeued job waits out SLURM's requeue delay
    # requeued expert: finished in its second life, from its checkpoint
    legal = _record(run_dir, "train.legal")
    assert int(legal["slurm"]["slurm_restart_count"]) >= 1
    assert legal["train"]["resumed"]["last_logged_update"] >= 20 and legal["train"]["num_updates"] == 80
    # cancelled expert: no record; merge wrote the forest without it and failed
    assert not (run_dir / "records" / "train.bible.json").exists()
    forest = json.loads((run_dir / "forest.json").read_text())
    assert forest["missing"] == ["bible"] and "bible" not in [e["name"] for e in forest["experts"]]
    assert not (run_dir / "records" / "merge.json").exists()
    before = len(_ledger(run_dir))
    r = run_btm("run", cfg, "--run-dir", run_dir, check=True)
    new = _ledger(run_dir)[before:]
    assert [row["job"] for row in new][:2] == ["train", "merge"]
    assert next(row for row in new if row["job"] == "train")["units"] == ["bible"]
    _wait_done(slurm_cluster, run_dir, timeout=900)
    bible = _record(run_dir, "train.bible")
    assert bible["train"]["resumed"]["last_logged_update"] >= 20 and bible["train"]["num_updates"] == 80
    assert _record(run_dir, "merge")
    assert "jobs to submit: 0" in run_btm("run", cfg, "--run-dir", run_dir, check=True).stdout
