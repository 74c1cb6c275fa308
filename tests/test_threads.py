"""Stage processes size torch's and OpenMP's threads from their SLURM allocation."""
from __future__ import annotations

import pytest

from conftest import run_btm
from launcher.contract.errors import BtmError
from launcher.threads import slurm_thread_env
from test_stages_branch_json import _run_with_trained_experts


def test_threads_come_from_the_cpus_of_the_task_shared_by_its_processes():
    assert slurm_thread_env({"SLURM_CPUS_PER_TASK": "10"}) == {"OMP_NUM_THREADS": "10"}
    assert slurm_thread_env({"SLURM_CPUS_PER_TASK": "10"}, nproc=4) == {"OMP_NUM_THREADS": "2"}
    assert slurm_thread_env({"SLURM_CPUS_PER_TASK": "2"}, nproc=4) == {"OMP_NUM_THREADS": "1"}


def test_outside_slurm_or_when_the_user_chose_nothing_is_set():
    assert slurm_thread_env({}) == {}
    assert slurm_thread_env({"SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "3"}) == {}


@pytest.mark.parametrize("raw", ["two", "0"])
def test_a_bad_allocation_is_an_error_naming_the_variable(raw):
    with pytest.raises(BtmError, match=f"SLURM_CPUS_PER_TASK='{raw}'"):
        slurm_thread_env({"SLURM_CPUS_PER_TASK": raw})


def test_a_stage_under_slurm_gets_its_threads_from_the_allocation(tmp_path, monkeypatch):
    layout = _run_with_trained_experts(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    r = run_btm("stage", layout.root, "merge", "--force", env={"SLURM_CPUS_PER_TASK": "3"}, check=True)
    assert "OMP_NUM_THREADS=3 (from SLURM_CPUS_PER_TASK=3, 1 process(es))" in r.stdout
    # A value the user exported wins over the allocation, as under the local executor.
    r = run_btm("stage", layout.root, "merge", "--force",
                env={"SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "1"}, check=True)
    assert "OMP_NUM_THREADS=" not in r.stdout
