"""Arrays past the cluster's MaxArraySize, on the real SLURM test cluster (MaxArraySize set to 2
for the test): btm's slurm executor splits a five-unit array into three arrays, one of whose
tasks fails; every other task of every part runs, and the job that collects them (afterany on
the array, like merge on the experts) runs after all parts, whichever part the failure was in."""
from __future__ import annotations

import json

import pytest

from launcher.plan import Job, Unit
from launcher.profiles import load_profile
from launcher.sbatch import SbatchContext

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

UNITS = [f"u{i}" for i in range(5)]
FAILING = "u2"  # in the second part (u2, u3)


def _argv(job: Job, unit: str | None) -> list[str]:
    """After `python -m launcher`: `--help` succeeds at once; a stage of a run directory that does
    not exist fails (exit 2), so the failing task is a real task failure."""
    return ["stage", "/nonexistent-run", "train"] if unit == FAILING else ["--help"]


@pytest.fixture
def max_array_size_2(slurm_cluster):
    old = slurm_cluster.reconfigure(MaxArraySize="2")
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.reconfigure(**old)


def test_array_past_max_array_size_runs_every_task_and_collects_after_all_parts(max_array_size_2, tmp_path):
    from launcher.executors.slurm import submit
    from launcher.scheduler import max_array_size

    cluster = max_array_size_2
    assert max_array_size() == 2  # read from `scontrol show config`
    run_dir = tmp_path / "run"
    work = Job(name="work", stage="work", units=[Unit(u) for u in UNITS], array=True, time=5, mem="500M")
    collect = Job(name="collect", stage="collect", units=[Unit(None)], after_any=["work"], time=5, mem="500M")
    ctx = SbatchContext(run_dir=str(run_dir), run_name="arrays", array_parallelism=2)
    rows = submit([work, collect], load_profile("slurm-test"), ctx, _argv)
    parts = [r for r in rows if r["job"] == "work"]
    assert [r["units"] for r in parts] == [["u0", "u1"], ["u2", "u3"], ["u4"]]
    assert json.loads((run_dir / "jobs" / "submissions.json").read_text()) == rows

    collect_id = next(r["job_id"] for r in rows if r["job"] == "collect")
    (collect_row,) = cluster.wait_job(collect_id, timeout=300)
    logs = {p.name: p.read_text()[-2000:] for p in (run_dir / "jobs" / "submitit").glob("*.out")}
    assert collect_row["State"] == "COMPLETED", (collect_row, logs)
    states = {}
    for part in parts:
        n = len(part["units"])
        for r in cluster.wait_job(part["job_id"], count=n, timeout=60):
            index = int(r["JobID"].split("_")[1]) if "_" in r["JobID"] else 0
            states[part["units"][index]] = r["State"].split()[0]
    assert states == {**{u: "COMPLETED" for u in UNITS}, FAILING: "FAILED"}, states
    # The collector started only after every part had ended (afterany on all their ids).
    ends = cluster.run(["sacct", "-X", "-n", "-P", "-o", "End", "-j", ",".join(r["job_id"] for r in parts)]).stdout.split()
    start = cluster.run(["sacct", "-X", "-n", "-P", "-o", "Start", "-j", collect_id]).stdout.split()
    assert start and ends and start[0] >= max(ends), (start, ends)
