"""The lean trainer: learning, exact resume, preemption, kill-and-resume, bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, require_fairseq, run_btm

pytestmark = pytest.mark.fairseq

DOMAINS = ["bible", "code_python", "legal"]


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"), DOMAINS)


def _spec(data_dir, save_dir, **kw):
    from fairseq_ext.train import TrainSpec
    base = dict(data_dir=str(data_dir), domains=["bible"], save_dir=str(save_dir),
                tokens_per_batch=512, save_interval_updates=10, valid_max_tokens=4096,
                log_interval=5)
    base.update(kw)
    return TrainSpec(**base)


def test_lr_schedule_warmup_then_linear_decay():
    from fairseq_ext.train import lr_at
    assert lr_at(0, 1.0, 100, 0.08) == pytest.approx(1 / 8)
    assert lr_at(7, 1.0, 100, 0.08) == pytest.approx(1.0)
    assert lr_at(8, 1.0, 100, 0.08) == pytest.approx(1.0)
    assert lr_at(54, 1.0, 100, 0.08) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 100, 0.08) == 0.0


def test_trains_and_resumes_exactly(data_dir, tmp_path):
    import torch
    from fairseq_ext.checkpoint import load_checkpoint
    from fairseq_ext.train import read_train_log, train_lm

    straight = train_lm(_spec(data_dir, tmp_path / "a", max_updates=20))
    assert straight.num_updates == 20 and not straight.preempted
    log = read_train_log(tmp_path / "a")
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] - 0.5  # it learns (char-level: ~4.8 -> <4.3 nats)
    assert all(r["tokens_per_s"] > 0 for r in log if "loss" in r)
    assert {r["update"] for r in log if "valid_loss" in r} == {10, 20}

    # Same run in two pieces (stop at 10, resume to 20) gives bit-identical weights.
    train_lm(_spec(data_dir, tmp_path / "b", max_updates=10, schedule_updates=20))
    resumed = train_lm(_spec(data_dir, tmp_path / "b", max_updates=20))
    assert resumed.num_updates == 20
    a = load_checkpoint(tmp_path / "a" / "checkpoint_last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint_last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert b["extra_state"]["btm"]["train_spec"]["max_updates"] == 20
    # Re-running a finished run is a no-op.
    again = train_lm(_spec(data_dir, tmp_path / "b", max_updates=20))
    assert again.num_updates == 20
    best = load_checkpoint(tmp_path / "a" / "checkpoint_best.pt")
    assert best["last_optimizer_state"] is None
    assert best["extra_state"]["btm"]["best_valid_loss"] == pytest.approx(straight.best_valid_loss)


def test_zero_updates_writes_random_init(data_dir, tmp_path):
    from fairseq_ext.checkpoint import load_checkpoint
    from fairseq_ext.train import train_lm
    r = train_lm(_spec(data_dir, tmp_path / "z", max_updates=0))
    assert r.num_updates == 0 and r.best_valid_loss > 4.0
    assert load_checkpoint(tmp_path / "z" / "checkpoint_last.pt")["extra_state"]["num_updates"] == 0


def _start_train(data_dir, save_dir, updates):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "train", "--data", str(data_dir), "--domain", "legal",
         "--save-dir", str(save_dir), "--updates", str(updates), "--tokens-per-batch", "256",
         "--save-interval-updates", "3", "--valid-max-tokens", "512", "--log-interval", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_update(save_dir, at_least, proc, timeout=120):
    from fairseq_ext.checkpoint import load_checkpoint
    deadline = time.time() + timeout
    path = save_dir / "checkpoint_last.pt"
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists() and os.path.exists(str(path) + ".sha256"):
            try:
                n = load_checkpoint(path)["extra_state"]["num_updates"]
            except Exception:
                n = -1  # sidecar from the previous save: try again
            if n >= at_least:
                return n
        time.sleep(0.2)
    raise AssertionError("trainer made no progress")


def test_sigusr2_saves_and_exits_preempted(data_dir, tmp_path):
    from launcher.contract.errors import PREEMPTED_EXIT
    from fairseq_ext.checkpoint import load_checkpoint
    save = tmp_path / "p"
    proc = _start_train(data_dir, save, 10_000)
    _wait_for_update(save, 3, proc)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err
    result = json.loads(out)
    assert result["preempted"] is True
    stopped = result["num_updates"]
    assert load_checkpoint(save / "checkpoint_last.pt")["extra_state"]["num_updates"] == stopped
    # Between save points the stop saves at once, without a validation pass that could
    # outlast the grace period; at a save point the scheduled validation runs as usual.
    from fairseq_ext.train import read_train_log
    last = [r for r in read_train_log(save) if r["update"] == stopped and "loss" not in r]
    assert len(last) == 1
    assert ("preempted_save" in last[0]) == (stopped % 3 != 0)
    assert ("valid_loss" in last[0]) == (stopped % 3 == 0)


@pytest.mark.slow
def test_sigkill_then_resume_at_last_saved_update(data_dir, tmp_path):
    from fairseq_ext.checkpoint import load_checkpoint
    from fairseq_ext.train import read_train_log
    save = tmp_path / "k"
    proc = _start_train(data_dir, save, 10_000)
    _wait_for_update(save, 6, proc)
    proc.kill()
    proc.wait()
    saved = load_checkpoint(save / "checkpoint_last.pt")["extra_state"]["num_updates"]
    assert saved >= 6 and saved % 3 == 0
    proc = _start_train(data_dir, save, saved + 2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(out)["num_updates"] == saved + 2
    updates = [r["update"] for r in read_train_log(save) if "loss" in r]
    assert updates == list(range(1, saved + 3))  # rows past the saved update were dropped


def test_bad_inputs(data_dir, tmp_path):
    from launcher.contract.errors import BtmError
    from fairseq_ext.train import train_lm
    with pytest.raises(BtmError, match="nope"):
        train_lm(_spec(data_dir, tmp_path / "x", domains=["nope"], max_updates=1))
    with pytest.raises(BtmError, match="dict.txt"):
        train_lm(_spec(tmp_path, tmp_path / "x", max_updates=1))
    with pytest.raises(BtmError, match="preset"):
        train_lm(_spec(data_dir, tmp_path / "x", preset="huge", max_updates=1))
    with pytest.raises(BtmError, match="not found"):
        train_lm(_spec(data_dir, tmp_path / "x", init=str(tmp_path / "missing.pt"), max_updates=1))
    proc = run_btm("train", "--data", data_dir, "--domain", "bible", "--save-dir", tmp_path / "y",
                   "--init", tmp_path / "missing.pt", "--updates", "1")
    assert proc.returncode == 2 and "missing.pt" in proc.stderr


def test_a_deleted_checkpoint_retrained_from_scratch_does_not_duplicate_the_log(data_dir, tmp_path):
    """issue 17: `btm train` again after checkpoint_last.pt was deleted trains from scratch;
    train_log.jsonl then holds that run's rows once, not the lost run's rows too."""
    from fairseq_ext.train import read_train_log

    save = tmp_path / "d"
    for attempt in range(2):
        proc = _start_train(data_dir, save, 4)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        if attempt == 0:
            (save / "checkpoint_last.pt").unlink()
            with open(save / "train_log.jsonl", "a") as f:
                f.write('{"update": 5, "lo')  # an append cut by a kill: goes with the lost rows
    updates = [r["update"] for r in read_train_log(save) if "loss" in r]
    assert updates == [1, 2, 3, 4]
