"""The real SLURM test cluster: it comes up, runs a submitit array across its three nodes with
states read from sacct, survives slurmctld restarts and slurmd crashes, and a second instance
starts and stops cleanly twice without disturbing the session's cluster. btm's slurm executor
submits exactly the script that launcher.sbatch renders (and the golden files pin)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.testcluster import reap_orphans
from slurm_testcluster import ClusterError, SlurmTestCluster, new_cluster_root

pytestmark = pytest.mark.slurm
TESTS = Path(__file__).resolve().parent


def where_am_i(task: int) -> dict:
    """Runs inside an array task (pickled by reference: the job imports this module)."""
    return {"task": task, "node": os.environ["SLURMD_NODENAME"], "host": socket.gethostname(),
            "job": os.environ["SLURM_JOB_ID"]}


def test_cluster_is_up_with_partitions_and_accounting(slurm_cluster):
    assert slurm_cluster.node_states() == {"node1": "idle", "node2": "idle", "node3": "idle"}
    assert os.environ["SLURM_CONF"] == slurm_cluster.env["SLURM_CONF"]
    partitions = slurm_cluster.run(["sinfo", "-h", "-o", "%P %l %D"]).stdout.split("\n")
    assert "debug 10:00 3" in partitions
    assert "batch* infinite 3" in partitions
    assert set(slurm_cluster.partitions) == {"debug", "batch"}
    # sacct answers only when slurmctld -> slurmdbd -> MariaDB all work.
    assert slurm_cluster.run(["sacct", "-X", "-n", "-S", "now-1hours"]).returncode == 0
    assert slurm_cluster.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]) \
        .stdout.split() == ["btmtest"]


def test_submitit_array_runs_on_three_nodes(slurm_cluster, tmp_path, monkeypatch):
    import submitit
    # The array task unpickles `where_am_i` by importing this module.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    # Each task asks for every CPU of a node, so the three tasks need three different nodes.
    # submitit asks SLURM for USR2 90 s before the time limit; with 2 minutes a loaded machine
    # got that signal while a finished task was still tearing down (state FAILED, exit 12).
    executor.update_parameters(slurm_partition="debug", timeout_min=5, nodes=1,
                               tasks_per_node=1, cpus_per_task=slurm_cluster.cpus_per_node,
                               name="btm-cluster-array")
    jobs = executor.map_array(where_am_i, [0, 1, 2])
    array_id = jobs[0].job_id.split("_")[0]
    assert {job.job_id for job in jobs} == {f"{array_id}_{i}" for i in range(3)}

    rows = slurm_cluster.wait_job(array_id, count=3, timeout=90)
    assert sorted(r["JobID"] for r in rows) == [f"{array_id}_{i}" for i in range(3)]
    assert {r["State"] for r in rows} == {"COMPLETED"}, rows
    assert {r["NodeList"] for r in rows} == {"node1", "node2", "node3"}, rows

    results = [job.result() for job in jobs]
    assert [r["task"] for r in results] == [0, 1, 2]
    assert {r["node"] for r in results} == {"node1", "node2", "node3"}
    # What each task saw agrees with what accounting recorded for it.
    by_id = {r["JobID"]: r["NodeList"] for r in rows}
    for job, result in zip(jobs, results):
        assert by_id[job.job_id] == result["node"]


def test_restart_slurmctld_keeps_running_jobs(slurm_cluster, tmp_path):
    job_id = slurm_cluster.run(["sbatch", "--parsable", "-p", "debug", "-t", "1",
                                f"--output={tmp_path}/out.txt",
                                "--wrap", "sleep 4; echo done"]).stdout.strip()
    slurm_cluster.wait_for("the job to start", lambda: slurm_cluster.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).stdout.strip() == "RUNNING", 30)
    old_pid = slurm_cluster.pids["slurmctld"]["pid"]
    slurm_cluster.restart_slurmctld()
    assert slurm_cluster.pids["slurmctld"]["pid"] != old_pid
    [row] = slurm_cluster.wait_job(job_id, timeout=60)
    assert row["State"] == "COMPLETED", row
    assert (tmp_path / "out.txt").read_text().strip() == "done"
    slurm_cluster.wait_idle()


def test_kill_and_restart_slurmd(slurm_cluster):
    slurm_cluster.kill_slurmd("node3")
    assert not slurm_cluster.is_alive("slurmd-node3")
    # The controller notices on its next ping: the node is flagged not responding ("*").
    slurm_cluster.wait_for("node3 not responding", lambda: slurm_cluster.node_states()
                           .get("node3", "").endswith("*"), timeout=60)
    slurm_cluster.start_slurmd("node3")
    slurm_cluster.wait_idle(timeout=60)
    assert slurm_cluster.is_alive("slurmd-node3")


@pytest.mark.slow
def test_second_cluster_starts_and_stops_twice(slurm_cluster):
    """A second instance, next to the session's, on its own ports: start/stop, twice."""
    root = new_cluster_root()
    other = SlurmTestCluster(root)
    try:
        for _ in range(2):
            other.start()
            assert not set(other.ports.values()) & set(slurm_cluster.ports.values())
            assert other.node_states() == {n: "idle" for n in other.nodes}
            pids = {name: info["pid"] for name, info in other.pids.items()}
            assert len(pids) == 7  # munged, mariadbd, slurmdbd, slurmctld, 3 x slurmd
            other.stop()
            assert other.running_daemons() == []
            assert all(_gone(pid) for pid in pids.values())
        # The session's cluster did not notice.
        assert slurm_cluster.node_states() == {n: "idle" for n in slurm_cluster.nodes}
    finally:
        other.stop()
        shutil.rmtree(root, ignore_errors=True)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except OSError:
        return True


@pytest.mark.slow
def test_script_start_status_stop(slurm_cluster):
    """scripts/slurm_test_cluster.sh: its daemons outlive the starting process, like a crashed
    run's leftovers would; the session's cluster keeps its ports; stop ends them all."""
    script = [str(TESTS.parent / "scripts" / "slurm_test_cluster.sh")]
    root = new_cluster_root()
    try:
        started = subprocess.run(script + ["start", str(root)], capture_output=True, text=True,
                                 timeout=120)
        assert started.returncode == 0, started.stderr
        assert started.stdout == f"export SLURM_CONF={root}/etc/slurm.conf\n"
        status = subprocess.run(script + ["status", str(root)], capture_output=True, text=True)
        assert status.returncode == 0, status.stdout + status.stderr
        assert len(re.findall(r"pid +\d+  up$", status.stdout, re.MULTILINE)) == 7
        state = json.loads((root / "state.json").read_text())
        assert state["owner"] is None  # never reaped as an orphan
        sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                               text=True, env={**os.environ, "SLURM_CONF": f"{root}/etc/slurm.conf"})
        assert set(sinfo.stdout.splitlines()) == {"node1 idle", "node2 idle", "node3 idle"}
        stopped = subprocess.run(script + ["stop", str(root)], capture_output=True, text=True,
                                 timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert all(_gone(info["pid"]) for info in state["pids"].values())
        again = subprocess.run(script + ["status", str(root)], capture_output=True, text=True)
        assert again.returncode == 1 and "no SLURM test cluster running" in again.stdout
    finally:
        subprocess.run(script + ["stop", str(root)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_cluster_of_a_crashed_process_is_reaped(slurm_cluster):
    """A process that starts a cluster and dies without stop(): its slurm daemons die with it
    (PR_SET_PDEATHSIG) and the next start's reap_orphans() stops the rest (mariadbd) by PID."""
    root = new_cluster_root()
    crash = (f"import os, sys; sys.path.insert(0, {str(TESTS)!r}); "
             f"from cluster.testcluster import SlurmTestCluster; "
             f"SlurmTestCluster({str(root)!r}).start(); os._exit(0)")
    try:
        subprocess.run([sys.executable, "-c", crash], check=True, timeout=120)
        leftover = SlurmTestCluster.load(root)
        pids = [info["pid"] for info in leftover.pids.values()]
        assert len(pids) == 7
        assert leftover.orphaned()
        assert reap_orphans(root.parent).count(root) == 1
        assert not root.exists()
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(pid) for pid in pids)
        assert slurm_cluster.node_states() == {n: "idle" for n in slurm_cluster.nodes}
    finally:
        if root.exists():
            SlurmTestCluster.load(root).stop()
            shutil.rmtree(root, ignore_errors=True)


def test_stop_signals_only_recorded_pids(tmp_path):
    """A state file whose PID was reused by another process must not get that process killed."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "state.json").write_text(json.dumps({
            "nodes": ["node1"], "cpus_per_node": 1, "mem_mb_per_node": 100, "ports": {},
            "pids": {"slurmctld": {"pid": bystander.pid, "start_time": 1, "argv": [], "log": ""}}}))
        cluster = SlurmTestCluster.load(tmp_path)
        assert cluster.running_daemons() == []
        cluster.stop()
        assert bystander.poll() is None
    finally:
        bystander.send_signal(signal.SIGTERM)
        bystander.wait()


def test_start_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    cluster = SlurmTestCluster(tmp_path)
    if os.geteuid() != 0:
        from conftest import require
        require(False, "the SLURM test cluster needs root")
    with pytest.raises(ClusterError, match="not empty and holds no test cluster"):
        cluster.start()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("true", "1 error")])
def test_without_cluster_tests_skip_locally_and_fail_under_ci(ci, outcome):
    """conftest.require semantics for the fixture, checked in a child pytest (cluster off)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SLURM_CONF")}
    env.update(BTM_SLURM_CLUSTER="off", CI=ci)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_cluster_is_up_with_partitions_and_accounting"],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in proc.stdout, proc.stdout + proc.stderr
    assert "switched off (BTM_SLURM_CLUSTER=off)" in proc.stdout
    assert proc.returncode == (0 if not ci else 1)


def test_btm_submits_exactly_the_rendered_script(slurm_cluster, tmp_path):
    """btm's slurm executor on the real cluster: the script submitit wrote and the one slurmctld
    holds are ``launcher.sbatch.submission(...).script`` (what the golden files pin), for an array
    and for a plain job depending on it; each task's pickled argv is its ``task_argvs`` entry.
    The jobs are held, so nothing runs; ``btm cancel``'s path then removes them."""
    import pickle

    from launcher.config import load_config
    from launcher.executors.slurm import cancel, submit
    from launcher.plan import build_plan
    from launcher.profiles import load_profile
    from launcher.sbatch import SbatchContext, submission

    held = dataclasses.replace(load_profile("slurm-test"), extra_sbatch=["--hold"])
    run_dir = tmp_path / "run"
    plan = build_plan(load_config("tiny"), held, str(run_dir))
    train, merge = plan.job("train"), plan.job("merge")  # an array of 3, and a job after it
    train = dataclasses.replace(train, after_ok=[], after_any=[])
    ctx = SbatchContext(run_dir=str(run_dir), run_name="tiny", array_parallelism=2)
    rows = submit([train, merge], held, ctx)
    try:
        folder = run_dir / "jobs" / "submitit"
        for row, job in zip(rows, (train, merge)):
            sub = submission(job, held, ctx)
            assert row["array"] == sub.array == (job is train)
            written = (folder / f"{row['job_id']}_submission.sh").read_text()
            assert written == sub.script, job.name
            held_by_slurm = slurm_cluster.run(["scontrol", "write", "batch_script", row["job_id"], "-"]).stdout
            assert held_by_slurm.rstrip("\n") == sub.script.rstrip("\n"), job.name
            pickles = ([folder / f"{row['job_id']}_{i}_submitted.pkl" for i in range(len(sub.units))]
                       if sub.array else [folder / f"{row['job_id']}_submitted.pkl"])
            for path, argv in zip(pickles, sub.task_argvs, strict=True):
                with path.open("rb") as f:
                    assert pickle.load(f).args[0] == argv
        assert f"#SBATCH --dependency=afterany:{rows[0]['job_id']}" in submission(merge, held, ctx).script
        states = slurm_cluster.run(["squeue", "-h", "-j", ",".join(r["job_id"] for r in rows), "-o", "%T"]).stdout
        assert set(states.split()) == {"PENDING"}, states
    finally:
        assert cancel(run_dir) == sorted(r["job_id"] for r in rows)
    slurm_cluster.wait_for("the held jobs to leave the queue", lambda: not slurm_cluster.run(
        ["squeue", "-h", "-j", ",".join(r["job_id"] for r in rows)], check=False).stdout.strip(), 30)
