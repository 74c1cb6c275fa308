"""One model on two processes of one node (torchrun, gloo on CPU): what a multi-GPU task runs.

The GPU version is the same code with nccl and one GPU per rank; what only a GPU can show
(nccl, torch.compile around DDP, bf16) is listed in docs/training.md. Each test here starts
real torchrun process groups (a launch: torchrun's and two workers' imports of torch and
fairseq, ~15 s on an idle 2-core machine, 25-30 s on a loaded one), hence ``slow``.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, require_fairseq

pytestmark = pytest.mark.fairseq

UPDATES = 24
FLAGS = ["--domain", "legal", "--updates", str(UPDATES), "--tokens-per-batch", "1024",
         "--save-interval-updates", "8", "--valid-max-tokens", "1024", "--log-interval", "1",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"), ["legal"])


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)


def _btm(data_dir, save_dir, *extra, env=None, **popen):
    return subprocess.Popen([sys.executable, "-m", "launcher", "train", "--data", str(data_dir),
                             "--save-dir", str(save_dir), *FLAGS, *extra], env=_env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _workers(btm_pid, timeout=120):
    """{rank: pid} of the torchrun workers under `btm train --nproc-per-node 2`."""
    from fairseq_ext.multiproc import children
    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = {}
        for torchrun in children(btm_pid):
            for pid in children(torchrun):
                try:
                    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                rank = [e[5:] for e in env if e.startswith(b"RANK=")]
                if rank:
                    ranks[int(rank[0])] = pid
        if len(ranks) == 2:
            return ranks
        time.sleep(0.2)
    raise AssertionError("the two torchrun workers did not start")


def _log(save_dir):
    from fairseq_ext.train import read_train_log
    return read_train_log(save_dir)


def _wait_for_logged_update(save_dir, at_least, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (save_dir / "train_log.jsonl").exists() and any(
                r.get("update", 0) >= at_least for r in _log(save_dir)):
            return
        time.sleep(0.1)
    raise AssertionError("training made no progress")


def _assert_one_checkpoint_set(save_dir, validated=True):
    """No temporary or per-rank files; checkpoint_best exists once a validation has run (a stop
    before the first save interval saves checkpoint_last only)."""
    best = ["checkpoint_best.pt", "checkpoint_best.pt.sha256"] if validated else []
    assert sorted(p.name for p in save_dir.iterdir()) == [
        *best, "checkpoint_last.pt", "checkpoint_last.pt.sha256", "train_log.jsonl"]


def _assert_stop_logged(save, k):
    """Validation rows at the save interval (8) only; a stop between save points saves at once
    without validating (fairseq_ext/train.py: validation could outlast the grace period)."""
    rows = _log(save)
    assert [r["update"] for r in rows if "valid_loss" in r] == [u for u in (8, 16) if u <= k]
    assert [r["update"] for r in rows if r.get("preempted_save")] == ([k] if k % 8 else [])


@pytest.mark.slow
def test_two_processes_stop_together_resume_and_match_one(data_dir, tmp_path):
    import torch
    from fairseq_ext.checkpoint import load_checkpoint
    from fairseq_ext.train import TrainSpec, train_lm
    from launcher.contract.errors import PREEMPTED_EXIT

    save = tmp_path / "two"
    # 1. `btm train --nproc-per-node 2` (what a multi-GPU stage runs); SIGUSR2 reaches rank 1
    # only, as when a signal lands on the ranks an update apart: rank 0 must stop at the same
    # update (else it waits forever in the next gradient all-reduce) and save once.
    proc = _btm(data_dir, save, "--nproc-per-node", "2")
    ranks = _workers(proc.pid)
    _wait_for_logged_update(save, 2, proc)
    os.kill(ranks[1], signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err
    stopped = json.loads(out)
    k = stopped["num_updates"]
    assert stopped["preempted"] is True and 2 <= k < UPDATES
    assert load_checkpoint(save / "checkpoint_last.pt")["extra_state"]["num_updates"] == k
    _assert_stop_logged(save, k)
    _assert_one_checkpoint_set(save, validated=k >= 8)

    # 2. Resume on two processes under torchrun itself (the documented manual command; the
    # probe records which rank saves what). It continues at update k + 1 and finishes.
    saves = tmp_path / "saves.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "torchrun_probe.py"), "train", "--data", str(data_dir),
         "--save-dir", str(save), *FLAGS],
        env=_env(BTM_PROBE_SAVES=str(saves)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_updates"] == UPDATES  # one JSON: only rank 0 prints
    rows = [json.loads(line) for line in saves.read_text().splitlines()]
    assert {r["rank"] for r in rows} == {0}
    assert [r["update"] for r in rows if r["file"] == "checkpoint_last.pt"] == [
        u for u in (8, 16, 24) if u > k]
    trained = [r["update"] for r in _log(save) if "loss" in r]
    assert trained == list(range(1, UPDATES + 1))  # k+1.. follow 1..k: none lost, none twice
    _assert_one_checkpoint_set(save)

    # 3. One process with update_freq 2 computes the same micro-batches as the two ranks, so
    # the ranks stayed in sync iff the result matches it (only the order of float sums
    # differs); a missing all-reduce or a wrong loss scale is off by orders of magnitude.
    one = train_lm(TrainSpec(data_dir=str(data_dir), domains=["legal"], save_dir=str(tmp_path / "one"),
                             max_updates=UPDATES, tokens_per_batch=1024, update_freq=2,
                             save_interval_updates=8, valid_max_tokens=1024, log_interval=1,
                             device="cpu"))
    a = load_checkpoint(save / "checkpoint_last.pt")["model"]
    b = load_checkpoint(tmp_path / "one" / "checkpoint_last.pt")["model"]
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-5, msg=name)
    two_losses = [r["loss"] for r in _log(save) if "loss" in r]
    one_losses = [r["loss"] for r in _log(tmp_path / "one") if "loss" in r]
    assert two_losses == pytest.approx(one_losses, abs=1e-4)  # the whole batch's loss, logged
    assert one_losses[-1] < one_losses[0] - 0.5  # and it learns
    final = load_checkpoint(save / "checkpoint_last.pt")["extra_state"]["btm"]["valid_losses"]
    assert final["legal"] == pytest.approx(one.valid_losses["legal"], abs=1e-4)


@pytest.mark.slow
def test_sigusr2_to_the_group_while_workers_start(data_dir, tmp_path):
    """The stop arrives before the workers have a handler (they ignore it, not die from it);
    torchrun, in the signalled group too, survives, and the stop is not lost: `btm` records it
    in the stop file, which the workers read after their first update, so they stop there.

    The workers sleep 8 s before training (BTM_TEST_WORKER_START_DELAY_S), so the signal, sent
    as soon as they exist, lands in the start window every time; the outcome (stop after update
    1, exit 3) is the same whatever the timing. It used to rely on a SIGUSR2 forwarded once a
    second landing during training, and a short run on a loaded machine could end first."""
    from fairseq_ext.checkpoint import load_checkpoint
    from launcher.contract.errors import PREEMPTED_EXIT

    save = tmp_path / "early"
    proc = _btm(data_dir, save, "--nproc-per-node", "2", env={"BTM_TEST_WORKER_START_DELAY_S": "8"},
                start_new_session=True)
    _workers(proc.pid)
    os.killpg(proc.pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err
    result = json.loads(out)
    k = result["num_updates"]
    assert result["preempted"] is True and k == 1
    assert load_checkpoint(save / "checkpoint_last.pt")["extra_state"]["num_updates"] == k
    _assert_stop_logged(save, k)
    _assert_one_checkpoint_set(save, validated=k >= 8)
