"""Data-parallel training across nodes on the real SLURM test cluster (gloo on CPU): a job of
2 nodes x 1 rank (srun tasks, env:// initialization, fairseq_ext/multinode.py) computes what
one process with update_freq 2 computes; a stop sent to the rank on the second node stops
both ranks after the same update and the job run again resumes exactly; a node that dies
mid-training gets the job requeued (no rank waits past the collective timeout) and resumed."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import REPO, require_fairseq, run_btm

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.fairseq]

UPDATES = 16  # room between the first checkpoint (update 4) and the end for a stop or a node death


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"), ["bible", "legal"])


def _train_args(data_dir: Path, save_dir: Path, updates: int) -> list[str]:
    # 4 sequences of 128 tokens per update: 2 per rank on 2 ranks, or 2 micro-batches of 2.
    return ["train", "--data", str(data_dir), "--domain", "bible", "--save-dir", str(save_dir),
            "--updates", str(updates), "--save-interval-updates", "4", "--log-interval", "1",
            "--tokens-per-batch", "512", "--valid-max-tokens", "1024", "--device", "cpu"]


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The reference: one process, update_freq 2, UPDATES updates."""
    save = tmp_path_factory.mktemp("one") / "bible"
    run_btm(*_train_args(data_dir, save, UPDATES), "--update-freq", "2", check=True)
    return save


def _sbatch_two_nodes(cluster, data_dir: Path, save_dir: Path, log: Path, *extra: str) -> str:
    import shlex
    import sys

    argv = [sys.executable, "-u", "-m", "launcher", *_train_args(data_dir, save_dir, UPDATES), "--nodes", "2"]
    return cluster.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                        "--mem=1000M", "-t", "10", f"--output={log}", "--open-mode=append", *extra,
                        f"--export=ALL,PYTHONPATH={REPO},BTM_COLLECTIVE_TIMEOUT_S=60",
                        "--wrap", shlex.join(argv)]).stdout.strip().split(";")[0]


def _params(path: Path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_close(a: Path, b: Path) -> None:
    import torch
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    worst = max((pa[k].float() - pb[k].float()).abs().max().item() for k in pa)
    assert worst <= 2e-5, f"parameters differ by {worst}"
    assert torch.load(a, map_location="cpu", weights_only=True)["extra_state"]["num_updates"] == UPDATES


def _rank_pid(rank: int, timeout: float = 180) -> int:
    """The pid of the srun task that is trainer rank ``rank`` (found in /proc: every node of the
    test cluster is this host), once it is training (its log has an update row)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"fairseq_ext.multinode" in cmd and f"SLURM_PROCID={rank}".encode() in env:
                return int(entry.name)
        time.sleep(0.5)
    raise AssertionError(f"no running rank {rank} within {timeout}s")


def test_two_nodes_equal_one_process_with_update_freq_2(slurm_cluster, data_dir, one_process, tmp_path):
    save = tmp_path / "bible"
    job = _sbatch_two_nodes(slurm_cluster, data_dir, save, tmp_path / "job.log")
    (row,) = slurm_cluster.wait_job(job, timeout=600)
    log = (tmp_path / "job.log").read_text()
    assert row["State"] == "COMPLETED", log
    hosts = slurm_cluster.run(["scontrol", "show", "hostnames", row["NodeList"]]).stdout.split()
    assert len(hosts) == 2, row  # two nodes of the cluster
    steps = slurm_cluster.run(["sacct", "-j", job, "-n", "-P", "-o", "JobID,NodeList,NTasks"]).stdout
    assert any(line.split("|")[2] == "2" for line in steps.splitlines() if ".0|" in line), steps  # one srun step, 2 tasks
    _assert_close(save / "checkpoint_last.pt", one_process / "checkpoint_last.pt")


def test_stop_on_the_second_node_then_resume_is_exact(slurm_cluster, data_dir, one_process, tmp_path):
    save = tmp_path / "bible"
    job = _sbatch_two_nodes(slurm_cluster, data_dir, save, tmp_path / "first.log")
    rank1 = _rank_pid(1)
    deadline = time.monotonic() + 180
    while not (save / "train_log.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(rank1, signal.SIGUSR2)  # a stop seen by rank 1 only: both ranks stop at the same update
    (row,) = slurm_cluster.wait_job(job, timeout=300)
    first = (tmp_path / "first.log").read_text()
    assert row["ExitCode"].startswith("3:"), (row, first)  # saved, asks to be requeued
    import torch
    stopped_at = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["extra_state"]["num_updates"]
    assert 0 < stopped_at < UPDATES, stopped_at
    again = _sbatch_two_nodes(slurm_cluster, data_dir, save, tmp_path / "second.log")
    (row,) = slurm_cluster.wait_job(again, timeout=600)
    assert row["State"] == "COMPLETED", (tmp_path / "second.log").read_text()
    _assert_close(save / "checkpoint_last.pt", one_process / "checkpoint_last.pt")


def _node_processes(job_id: str, node: str) -> list[int]:
    """What dies with ``node`` of the test cluster (all nodes are this host): the job's ranks on
    it (SLURMD_NODENAME) and its slurmstepds (their unix sockets are in the node's spool dir)."""
    sockets = {}  # inode -> path
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8:
            sockets[fields[6]] = fields[7]
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            fds = [os.readlink(f"/proc/{entry.name}/fd/{fd}") for fd in os.listdir(f"/proc/{entry.name}/fd")]
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env and f"SLURMD_NODENAME={node}".encode() in env:
            pids.append(int(entry.name))
        elif cmd.startswith(f"slurmstepd: [{job_id}.".encode()) and any(
                f"/spool/{node}/" in sockets.get(fd[len("socket:["):-1], "") for fd in fds if fd.startswith("socket:[")):
            pids.append(int(entry.name))
    return pids


def _final_state(cluster, job: str, timeout: float) -> str:
    """The job's state once it has left the queue for good (a requeued job passes through
    NODE_FAIL/REQUEUED and PENDING before it runs again)."""
    state = ""

    def done() -> bool:
        nonlocal state
        if cluster.run(["squeue", "-h", "-j", job], check=False).stdout.strip():
            return False
        rows = cluster.sacct(job)
        state = rows[-1]["State"].split()[0] if rows else ""
        return state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY")
    cluster.wait_for(f"job {job} to end", done, timeout)
    return state


def test_a_node_dies_mid_training_the_job_is_requeued_and_resumes(slurm_cluster, data_dir, one_process, tmp_path):
    """node2 dies mid-training: its slurmd killed and the job's processes on it frozen (a dead
    machine sends no connection reset; killed processes on this shared host would). Rank 0
    waits in its collective at most the collective timeout (60 s); SLURM declares the node
    down first (SlurmdTimeout 15 s) and requeues the job (--requeue) onto other nodes, where it
    resumes from checkpoint_last and ends at the uninterrupted result."""
    save = tmp_path / "bible"
    job = _sbatch_two_nodes(slurm_cluster, data_dir, save, tmp_path / "job.log", "--requeue")
    rank1 = _rank_pid(1)  # srun task 1: on the job's second node
    deadline = time.monotonic() + 180
    while not (save / "checkpoint_last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    # Freeze rank 1 at once so training cannot run to its end before the node is taken down
    # (rank 0 then waits in its next collective); it is among the node's processes frozen below.
    os.kill(rank1, signal.SIGSTOP)
    nodes = slurm_cluster.run(["squeue", "-h", "-j", job, "-o", "%N"]).stdout.strip()
    second = slurm_cluster.run(["scontrol", "show", "hostnames", nodes]).stdout.split()[1]
    slurm_cluster.kill_slurmd(second)
    frozen = _node_processes(job, second)
    assert frozen
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        slurm_cluster.wait_for("the job requeued", lambda: "Restarts=1" in slurm_cluster.run(
            ["scontrol", "show", "job", job], check=False).stdout, timeout=120)
        for pid in frozen:  # what a dead node's processes are: gone
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        slurm_cluster.start_slurmd(second)
        state = _final_state(slurm_cluster, job, timeout=600)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not slurm_cluster.is_alive(f"slurmd-{second}"):
            slurm_cluster.start_slurmd(second)
        slurm_cluster.wait_idle(timeout=120)
    log = (tmp_path / "job.log").read_text()
    assert state == "COMPLETED", (state, log)
    _assert_close(save / "checkpoint_last.pt", one_process / "checkpoint_last.pt")



def test_a_two_node_seed_feeds_the_expert_array_and_the_run_completes(slurm_cluster, small_corpus, tmp_path):
    """`btm run` with a budget of 2 GPUs on the slurm-test profile (max_nodes 2, CPU): the seed
    job spans 2 nodes (srun step of 2 ranks under submitit), the experts are a normal array."""
    import json
    import textwrap

    require_fairseq()
    cfg = tmp_path / "two-node-seed.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: two-node-seed
        corpus: {{path: {small_corpus}, vocab_size: 500}}
        domains: {{train: [bible, code_python, legal], eval: [bible]}}
        model: {{preset: tiny}}
        budget: {{total_updates: 16, gpus: 2, seed_fraction: 0.5, save_interval_updates: 4}}
        evaluation: {{methods: [experts, ensemble_uniform]}}
        executor: slurm
        profile: slurm-test
        max_parallel: 3
        """))
    run_dir = tmp_path / "run"
    dry = run_btm("run", cfg, "--run-dir", run_dir, "--dry-run", check=True).stdout
    assert "seed launch (2 nodes): srun --nodes=2 --ntasks-per-node=1" in dry, dry
    run_btm("run", cfg, "--run-dir", run_dir, check=True, env={"BTM_COLLECTIVE_TIMEOUT_S": "60"})
    ledger = json.loads((run_dir / "jobs" / "submissions.json").read_text())
    ids = [row["job_id"] for row in ledger]
    slurm_cluster.wait_for("the run's jobs to leave the queue", lambda: not slurm_cluster.run(
        ["squeue", "-h", "-j", ",".join(ids)], check=False).stdout.strip(), timeout=900)
    status = run_btm("status", run_dir, check=True).stdout
    assert "units done" in status and (run_dir / "results" / "results.csv").is_file(), status
    seed = json.loads((run_dir / "records" / "seed.json").read_text())
    hosts = slurm_cluster.run(["scontrol", "show", "hostnames", seed["slurm"]["slurm_job_nodelist"]]).stdout.split()
    assert len(hosts) == 2, seed["slurm"]
    assert seed["train"]["num_updates"] == 8
    trains = [json.loads((run_dir / "records" / f"train.{d}.json").read_text()) for d in ("bible", "code_python", "legal")]
    assert all(t["started"] >= seed["finished"] for t in trains)
