"""Fault injection: what a long run on a shared cluster meets, and what must survive it.

- a process killed (SIGKILL) in the middle of writing checkpoint_last (a real kill, inside
  torch.save), a truncated checkpoint_last, a stale temp file from a killed save;
- a full disk under the save directory (a real tmpfs of a few MB, mounted by this root test);
- one expert's data missing (stages run by hand: the other expert finishes, merge names it);
- on the real SLURM test cluster: the node of a training expert dies (its slurmd and the job's
  processes killed) and slurmctld is restarted mid-pipeline; the expert is requeued on another
  node, resumes from its checkpoint, and the run completes with intact outputs.

Everything uses the tiny preset, a few updates and the small test corpus. docs/reliability.md
summarises the results.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, require, require_fairseq, run_btm

pytestmark = [pytest.mark.slow, pytest.mark.fairseq]

DOMAINS = ["bible", "code_python", "legal"]


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"), DOMAINS)


def _train_args(data_dir, save_dir, updates, *extra):
    return ["train", "--data", data_dir, "--domain", "bible", "--save-dir", save_dir, "--updates", str(updates),
            "--save-interval-updates", "5", "--log-interval", "5", "--tokens-per-batch", "512",
            "--valid-max-tokens", "2048", *extra]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """An expert that trained 10 updates (checkpoint_last at 10); tests work on copies."""
    save = tmp_path_factory.mktemp("base") / "bible"
    run_btm(*_train_args(data_dir, save, 10), check=True)
    return save


@pytest.fixture(scope="module")
def fault_free(data_dir, trained, tmp_path_factory):
    """The base expert trained on, uninterrupted, to 15 and to 20 updates (what the fault
    tests' final checkpoints must equal): {updates: save dir}."""
    out = {}
    for updates in (15, 20):
        save = _copy(trained, tmp_path_factory.mktemp(f"fault_free_{updates}") / "bible")
        run_btm(*_train_args(data_dir, save, updates), check=True)
        out[updates] = save
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _updates(save: Path) -> list[int]:
    from fairseq_ext.train import read_train_log
    return [r["update"] for r in read_train_log(save) if "loss" in r]


def _intact(path: Path) -> int:
    """The checkpoint matches its sidecar and loads weights_only; returns its update count."""
    from fairseq_ext.checkpoint import load_checkpoint, num_updates
    return num_updates(load_checkpoint(path))


def _no_temp_files(d: Path) -> None:
    assert not [p.name for p in d.rglob("*.tmp")], sorted(p.name for p in d.iterdir())


# ---- the fault-free reference ----------------------------------------------------------------
#
# "After each fault, the final forest matches the fault-free run's." The trainer resumes
# bit-exactly (test_train.py::test_trains_and_resumes_exactly) and training on the CPU with the
# same thread count is deterministic, so a fault that btm recovered from must leave no trace:
# every expert's weights, optimizer state, data-stream position and RNG state are compared with
# the fault-free run's bit for bit (torch.equal), not within a tolerance. Only the results table
# gets a tolerance (_assert_same_results).

def _same(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and plain values are equal; tensors bit for bit."""
    import torch
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: differs from the fault-free run"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _assert_same_checkpoint(path: Path, ref: Path) -> None:
    """``path`` holds what the fault-free run's ``ref`` holds: updates, model, and (when both are
    checkpoint_last) optimizer, data stream, RNG and validation losses. Paths and timings in the
    training spec differ between the two runs and are not compared."""
    from fairseq_ext.checkpoint import load_checkpoint, num_updates
    a, b = load_checkpoint(path), load_checkpoint(ref)
    assert num_updates(a) == num_updates(b), (path, num_updates(a), num_updates(b))
    _same(a["model"], b["model"], f"{path} model")
    _same(a["last_optimizer_state"], b["last_optimizer_state"], f"{path} optimizer")
    for key in ("data_state", "torch_rng", "best_valid_loss", "valid_losses"):
        _same(a["extra_state"]["btm"].get(key), b["extra_state"]["btm"].get(key), f"{path} {key}")


def _assert_same_forest(run_dir: Path, ref_dir: Path) -> list[str]:
    """Every expert of RUN's forest.json is in the fault-free REF's, with the same training
    history and a checkpoint of the same content (the sha256 differs: the checkpoint's config
    names its run directory). Returns the experts compared."""
    forest = json.loads((run_dir / "forest.json").read_text())
    ref = {e["name"]: e for e in json.loads((ref_dir / "forest.json").read_text())["experts"]}
    names = [e["name"] for e in forest["experts"]]
    assert names and set(names) <= set(ref), (names, sorted(ref))
    for e in forest["experts"]:
        r = ref[e["name"]]
        assert (e["domains"], e["parents"], e["updates"], e["tokens"]) == \
            (r["domains"], r["parents"], r["updates"], r["tokens"]), e["name"]
        _assert_same_checkpoint(run_dir / e["checkpoint"], ref_dir / r["checkpoint"])
        last = Path(e["checkpoint"]).with_name("checkpoint_last.pt")
        if (run_dir / last).exists() and (ref_dir / last).exists():
            _assert_same_checkpoint(run_dir / last, ref_dir / last)
    return names


# Results: with bit-identical experts the scores are computed from identical float32 inputs by
# the same code, so the nll agree to the last bit when the scoring runs the same way; 1e-6
# relative (a thousandth of the 1e-3 that separates the paper's methods) only leaves room for
# a different float summation order in the scoring of identical weights.
RESULTS_RTOL = 1e-6


def _assert_same_results(run_dir: Path, ref_dir: Path) -> int:
    """Every (method, k, prior, eval domain, split) row of the fault-free run's results table is
    in RUN's, over the same tokens, with nll and ppl within RESULTS_RTOL. Returns the row count."""
    from launcher.contract.results import read_results
    key = ["method", "k", "prior", "eval_domain", "split"]
    got, ref = (read_results(d).set_index(key).sort_index() for d in (run_dir, ref_dir))
    assert list(got.index) == list(ref.index), (list(got.index), list(ref.index))
    assert (got["tokens"] == ref["tokens"]).all()
    for col in ("nll", "ppl"):
        assert got[col].to_numpy() == pytest.approx(ref[col].to_numpy(), rel=RESULTS_RTOL), col
    return len(got)


# ---- checkpoints under kill ------------------------------------------------------------------

KILL_MID_SAVE = textwrap.dedent("""\
    # Train; on the 2nd save of checkpoint_last, write half the bytes and die by SIGKILL.
    import io, os, signal, sys, torch
    import fairseq_ext.checkpoint as ck
    real_save, count = torch.save, [0]
    def dying_save(obj, f, *a, **k):
        if str(f).startswith(os.path.join(sys.argv[2], ".checkpoint_last.pt.")):
            count[0] += 1
            if count[0] == 2:
                buf = io.BytesIO(); real_save(obj, buf)
                with open(f, "wb") as out:
                    out.write(buf.getvalue()[: len(buf.getvalue()) // 2]); out.flush(); os.fsync(out.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    ck.torch.save = dying_save
    from fairseq_ext.train import TrainSpec, train_lm
    train_lm(TrainSpec(data_dir=sys.argv[1], domains=["bible"], save_dir=sys.argv[2], max_updates=20,
                       save_interval_updates=5, log_interval=5, tokens_per_batch=512, valid_max_tokens=2048))
""")


def test_sigkill_while_writing_checkpoint_last_then_resume(data_dir, trained, fault_free, tmp_path):
    save = _copy(trained, tmp_path / "bible")  # checkpoint_last at 10; saves at 15 and 20
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(data_dir), str(save)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    # the half-written temp file is there, checkpoint_last is the complete one from update 15
    assert [q.name for q in save.glob(".checkpoint_last.pt.*.tmp")], sorted(q.name for q in save.iterdir())
    assert _intact(save / "checkpoint_last.pt") == 15
    r = run_btm(*_train_args(data_dir, save, 20))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_updates"] == 20
    assert _updates(save) == [5, 10, 15, 20]  # resumed at 15: no restart from 0, no duplicated rows
    assert _intact(save / "checkpoint_last.pt") == 20
    _no_temp_files(save)  # the killed save's temp file was cleared on resume
    # the kill left no trace: the same weights, optimizer and data position as never killed
    _assert_same_checkpoint(save / "checkpoint_last.pt", fault_free[20] / "checkpoint_last.pt")
    _assert_same_checkpoint(save / "checkpoint_best.pt", fault_free[20] / "checkpoint_best.pt")


def test_truncated_checkpoint_last_is_refused_with_a_clear_message(data_dir, trained, tmp_path):
    save = _copy(trained, tmp_path / "bible")
    last = save / "checkpoint_last.pt"
    log_before = (save / "train_log.jsonl").read_bytes()
    best_before = (save / "checkpoint_best.pt").read_bytes()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    r = run_btm(*_train_args(data_dir, save, 20))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "checkpoint_last.pt" in r.stderr and "sidecar" in r.stderr and "corrupt" in r.stderr, r.stderr
    assert (save / "train_log.jsonl").read_bytes() == log_before  # nothing else touched
    assert (save / "checkpoint_best.pt").read_bytes() == best_before
    # Without its sidecar the cut file is still never loaded: torch's reader refuses it.
    Path(str(last) + ".sha256").unlink()
    r = run_btm(*_train_args(data_dir, save, 20))
    assert r.returncode == 2 and "checkpoint_last.pt" in r.stderr and "cannot be read" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---- a full disk -------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_save_is_a_clear_error_and_keeps_the_last_checkpoint(data_dir, trained, fault_free,
                                                                              small_tmpfs):
    save = _copy(trained, small_tmpfs / "bible")
    before = {p.name: p.read_bytes() for p in save.iterdir() if p.suffix in (".pt", ".sha256")}
    free = shutil.disk_usage(small_tmpfs).free
    ck_size = (save / "checkpoint_last.pt").stat().st_size
    with open(small_tmpfs / "filler", "wb") as f:  # leave room for log rows, not for a checkpoint
        f.write(b"\0" * max(0, free - ck_size // 2))
    r = run_btm(*_train_args(data_dir, save, 15))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    # torch's zip writer hides ENOSPC ("unexpected pos"); save_checkpoint names the file and the space
    assert "could not write" in r.stderr and str(save) in r.stderr, r.stderr
    assert "No space left on device" in r.stderr or "is the disk full?" in r.stderr, r.stderr
    for name in ("checkpoint_last.pt", "checkpoint_last.pt.sha256"):  # untouched, still loads
        assert (save / name).read_bytes() == before[name], name
    assert _intact(save / "checkpoint_last.pt") == 10
    _intact(save / "checkpoint_best.pt")  # old or new (it is smaller: no optimizer), never partial
    _no_temp_files(save)
    # space again: the same command resumes from update 10 and finishes
    (small_tmpfs / "filler").unlink()
    r = run_btm(*_train_args(data_dir, save, 15))
    assert r.returncode == 0, r.stderr
    assert _intact(save / "checkpoint_last.pt") == 15 and _updates(save)[-1] == 15
    _assert_same_checkpoint(save / "checkpoint_last.pt", fault_free[15] / "checkpoint_last.pt")
    _assert_same_checkpoint(save / "checkpoint_best.pt", fault_free[15] / "checkpoint_best.pt")


# ---- one expert's data missing --------------------------------------------------------------

def _stage(run_dir, *args):
    return run_btm("stage", run_dir, *args)


def _staged_run(small_corpus, run_dir: Path) -> Path:
    """A run directory of a tiny two-expert config, ready for ``btm stage``."""
    from launcher.config import load_config
    cfg = load_config("tiny", {"name": "faults", "domains": {"train": ["bible", "legal"], "eval": ["bible"]},
                               "budget": {"total_updates": 8, "gpus": 1, "save_interval_updates": 4},
                               "corpus": {"path": str(small_corpus), "vocab_size": 400}}, corpus=small_corpus)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


@pytest.fixture(scope="module")
def fault_free_staged(small_corpus, tmp_path_factory):
    """The same config's stages up to the forest, with nothing missing."""
    require_fairseq()
    run_dir = _staged_run(small_corpus, tmp_path_factory.mktemp("fault_free_staged") / "run")
    for step in (["data_plan"], ["data_shard", "--unit", "t0"], ["data"], ["seed"], ["train", "--unit", "bible"], ["train", "--unit", "legal"], ["merge"]):
        r = _stage(run_dir, *step)
        assert r.returncode == 0, (step, r.stderr)
    return run_dir


def test_missing_expert_data_other_experts_finish_and_merge_names_it(small_corpus, fault_free_staged, tmp_path):
    require_fairseq()
    run_dir = _staged_run(small_corpus, tmp_path / "run")
    for step in (["data_plan"], ["data_shard", "--unit", "t0"], ["data"], ["seed"]):
        r = _stage(run_dir, *step)
        assert r.returncode == 0, r.stderr
    for ext in ("bin", "idx"):  # legal's training data disappears (a purge, a bad rsync) after the seed
        (run_dir / "data" / "legal" / f"train.{ext}").unlink()
    ok = _stage(run_dir, "train", "--unit", "bible")
    assert ok.returncode == 0, ok.stderr
    bad = _stage(run_dir, "train", "--unit", "legal")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "legal" in bad.stderr, bad.stderr
    merge = _stage(run_dir, "merge")
    assert merge.returncode == 2 and "legal" in merge.stderr and "Traceback" not in merge.stderr, merge.stderr
    forest = json.loads((run_dir / "forest.json").read_text())
    assert forest["missing"] == ["legal"] and [e["name"] for e in forest["experts"]] == ["bible"]
    assert run_btm("forest", "verify", run_dir).returncode == 0  # what finished is intact
    assert (run_dir / "records" / "train.bible.json").is_file()
    assert not (run_dir / "records" / "train.legal.json").exists()
    assert not (run_dir / "records" / "merge.json").exists()
    status = run_btm("status", run_dir, check=True).stdout
    assert "legal" in status
    # what finished is what the fault-free run made: the same data, seed and bible expert
    manifest = [json.loads((d / "data" / "manifest.json").read_text())["data_hash"] for d in (run_dir, fault_free_staged)]
    assert manifest[0] == manifest[1]
    _assert_same_checkpoint(run_dir / "seed" / "checkpoint_last.pt", fault_free_staged / "seed" / "checkpoint_last.pt")
    assert _assert_same_forest(run_dir, fault_free_staged) == ["bible"]


# ---- the real SLURM cluster: a node dies, the controller restarts -----------------------------

def _ledger(run_dir: Path) -> list[dict]:
    p = run_dir / "jobs" / "submissions.json"
    return json.loads(p.read_text()) if p.exists() else []


def _progress(run_dir: Path, expert: str) -> int:
    log = run_dir / "experts" / expert / "train_log.jsonl"
    if not (run_dir / "experts" / expert / "checkpoint_last.pt").exists() or not log.exists():
        return 0
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return max((r.get("update", 0) for r in rows if "valid_loss" in r), default=0)


def _job_processes(job_id: str) -> list[int]:
    """PIDs of processes running for SLURM job ``job_id`` (its batch step and children): the ones
    our test job started. A node crash takes them down with slurmd; we kill exactly these."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env or cmd.startswith(f"slurmstepd: [{job_id}.".encode()):
            pids.append(int(d.name))
    return pids


def _squeue(cluster, job: str) -> dict:
    out = cluster.run(["squeue", "-h", "-j", job, "-o", "%i|%T|%N"], check=False).stdout.strip().splitlines()
    return {line.split("|")[0]: line.split("|")[1:] for line in out}


def _pipeline_config(path: Path, corpus: Path, executor: str) -> Path:
    path.write_text(textwrap.dedent(f"""\
        name: faults
        corpus: {{path: {corpus}, vocab_size: 400}}
        domains: {{train: [bible, legal], eval: [bible]}}
        model: {{preset: tiny}}
        budget: {{total_updates: 160, gpus: 1, seed_fraction: 0.05, save_interval_updates: 10}}
        evaluation: {{methods: [experts, ensemble_uniform]}}
        """) + executor + "max_parallel: 2\n")
    return path


# One torch thread per stage in both runs: the cluster's nodes share this machine's cores (no
# affinity), the local executor would give each of 2 parallel units one core, and the same
# thread count is what makes the two runs' float arithmetic identical. sbatch exports it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def fault_free_pipeline(small_corpus, tmp_path_factory):
    """The cluster test's config run to the end without faults, by the local executor (the
    same stage commands as the sbatch tasks, without the scheduling waits). Session-scoped and
    requested before ``slurm_cluster``, so it runs before the shared cluster is started."""
    require_fairseq()
    tmp = tmp_path_factory.mktemp("fault_free_pipeline")
    cfg = _pipeline_config(tmp / "faults.yaml", small_corpus, "executor: local\n")
    run_btm("run", cfg, "--run-dir", tmp / "run", check=True, env=ONE_THREAD)
    return tmp / "run"


@pytest.mark.slurm
def test_node_crash_and_controller_restart_mid_pipeline(fault_free_pipeline, slurm_cluster, small_corpus, tmp_path):
    require_fairseq()
    run_dir = tmp_path / "run"
    cfg = _pipeline_config(tmp_path / "faults.yaml", small_corpus, "executor: slurm\nprofile: slurm-test\n")
    run_btm("run", cfg, "--run-dir", run_dir, check=True, env=ONE_THREAD)
    train = next(row for row in _ledger(run_dir) if row["job"] == "train")
    task = f"{train['job_id']}_{train['units'].index('bible')}"
    deadline = time.time() + 300
    while _progress(run_dir, "bible") < 20:
        assert time.time() < deadline, "the expert never got going"
        time.sleep(0.5)
    state = _squeue(slurm_cluster, task)
    [(_, (st, node))] = state.items()
    assert st == "RUNNING", state
    killed_at = _progress(run_dir, "bible")
    # The node dies: its slurmd and every process of the job on it.
    slurm_cluster.kill_slurmd(node)
    job_id = slurm_cluster.run(["squeue", "-h", "-j", task, "-o", "%A"]).stdout.strip()
    for pid in _job_processes(job_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        # SLURM notices (SlurmdTimeout=15), requeues the task (--requeue) onto another node.
        slurm_cluster.wait_for("the expert requeued onto another node",
                               lambda: (lambda s: bool(s) and list(s.values())[0][0] == "RUNNING"
                                        and list(s.values())[0][1] != node)(_squeue(slurm_cluster, task)),
                               timeout=240)
        # Restart the controller while the pipeline is still going.
        slurm_cluster.restart_slurmctld()
        deadline = time.time() + 420
        while any(_squeue(slurm_cluster, row["job_id"]) for row in _ledger(run_dir)):
            if time.time() > deadline:
                ids = ",".join(row["job_id"] for row in _ledger(run_dir))
                queue = slurm_cluster.run(["squeue", "-h", "-j", ids, "-o", "%i %T %R %N"], check=False).stdout
                slurm_cluster.run(["scancel", *ids.split(",")], check=False)
                raise AssertionError(f"pipeline still queued after the faults:\n{queue}\n"
                                     f"{run_btm('status', run_dir).stdout}")
            time.sleep(3)
    finally:
        slurm_cluster.start_slurmd(node)
        slurm_cluster.wait_idle(timeout=120)
    status = run_btm("status", run_dir, check=True).stdout
    assert "units done" in status and "/" in status
    rec = json.loads((run_dir / "records" / "train.bible.json").read_text())
    assert int(rec["slurm"]["slurm_restart_count"]) >= 1, rec["slurm"]
    assert rec["slurm"]["slurm_job_nodelist"] != node
    resumed = rec["train"]["resumed"]["last_logged_update"]
    assert resumed >= 20 and resumed >= killed_at - 10, rec["train"]  # not from 0
    ups = [json.loads(line)["update"] for line in (run_dir / "experts" / "bible" / "train_log.jsonl").read_text().splitlines()
           if "loss" in json.loads(line)]
    assert ups == sorted(set(ups)) and ups[0] <= 10  # one life's rows, then the next, no restart
    # outputs intact: the run finished, forest verifies, every checkpoint loads weights_only
    assert (run_dir / "results" / "results.csv").is_file(), status
    assert run_btm("forest", "verify", run_dir).returncode == 0
    import torch
    for pt in run_dir.rglob("*.pt"):
        torch.load(pt, weights_only=True)
    _no_temp_files(run_dir)
    assert "jobs to submit: 0" in run_btm("run", cfg, "--run-dir", run_dir, check=True).stdout
    # the final forest is the fault-free run's: bit-identical experts, the same results
    assert _assert_same_forest(run_dir, fault_free_pipeline) == ["bible", "legal"]
    assert _assert_same_results(run_dir, fault_free_pipeline) == 3  # 2 experts + the ensemble on bible
