"""benchmarks/gpu_check.sh runs end to end on a machine without a GPU, the GPU parts skipped."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, require_fairseq

pytestmark = pytest.mark.fairseq

STEPS = ("data", "gpu-tests", "train-speed", "score-speed", "pipeline")


def _gpu_check(tmp_path, *args, timeout):
    env = dict(os.environ, OUT=str(tmp_path), BTM_PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, (tmp_path / "gpu_check.log").read_text()


def test_inventory_lists_the_python_and_its_packages(tmp_path):
    proc, log = _gpu_check(tmp_path, "--inventory", timeout=300)
    assert proc.returncode == 0, log[-3000:]
    inventory = (tmp_path / "gpu_inventory.txt").read_text().splitlines()
    assert inventory[0].startswith(f"python {sys.version_info.major}.{sys.version_info.minor}.")
    assert any(line.startswith("torch==") for line in inventory)  # what gpu_wheels.sh leaves out


@pytest.mark.slow
def test_quick_check_runs_every_step_on_a_cpu(tmp_path):
    require_fairseq()
    proc, log = _gpu_check(tmp_path, "--quick", timeout=3700)
    assert proc.returncode == 0, log[-5000:]
    for step in STEPS:
        assert f"step {step}: exit 0" in log
    assert "device none (GPU parts skip)" in log
    for table in ("trainer", "scorer"):  # both side-by-side tables, with all three contenders
        header = log.index(f"{table:<8} {'tokens/s':>10}")
        assert [line.split()[0] for line in log[header:].splitlines()[1:4]] == ["fairseq", "btm", "plain"]
    assert log.count("load average at start") == 2 and log.count("load average at end") == 2
    assert "all steps passed" in log
