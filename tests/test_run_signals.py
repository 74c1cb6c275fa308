"""Signals to `btm run` (local executor) through the real CLI, on one run directory whose seed
LM trains long enough to be hit: SIGTERM and SIGHUP end it like Ctrl-C (exit 128 + signal, the
running stage saves and exits, nothing orphaned, the next run resumes), and after a SIGKILL,
which leaves the stage running, a re-run finds the unit's lock held and refuses instead of
starting a second process on the same unit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, require_fairseq, run_btm, write_small_corpus

pytestmark = [pytest.mark.fairseq, pytest.mark.slow]

# The seed LM gets 2000 updates: far more than the test waits for, so every signal lands while
# it trains (the run is never finished here; resuming exactly is test_train.py's).
CONFIG = """\
name: sig
corpus: {{path: {corpus}, vocab_size: 500}}
domains: {{train: [bible, legal], eval: [bible]}}
model: {{preset: tiny}}
budget: {{total_updates: 4000, gpus: 1, seed_fraction: 0.5, save_interval_updates: 1000}}
evaluation: {{methods: [experts]}}
max_parallel: 1
"""


def _start(cfg: Path, run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "launcher", "run", str(cfg), "--run-dir", str(run_dir),
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stage_pids(run_dir: Path) -> list[int]:
    """Live `python -m launcher stage RUN_DIR ...` processes of this run (from /proc)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"stage" in argv and str(run_dir).encode() in argv and state != "Z":
            pids.append(int(entry.name))
    return pids


def _log(run_dir: Path) -> list[dict]:
    log = run_dir / "seed" / "train_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _trained(run_dir: Path) -> list[int]:
    """Updates with a logged loss (every 10th: the stages' log interval)."""
    return [r["update"] for r in _log(run_dir) if "loss" in r]


def _wait_training_past(run_dir: Path, update: int, proc: subprocess.Popen, timeout=600) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        done = _trained(run_dir)
        if done and done[-1] > update:
            return done[-1]
        time.sleep(0.2)
    raise AssertionError(f"the seed LM did not train past update {update}")


def _saved_update(run_dir: Path) -> int:
    from fairseq_ext.checkpoint import load_checkpoint
    return load_checkpoint(run_dir / "seed" / "checkpoint_last.pt")["extra_state"]["num_updates"]


def test_sigterm_sighup_and_sigkill_of_btm_run(tmp_path):
    require_fairseq()
    corpus = write_small_corpus(tmp_path / "corpus", ["bible", "legal"], {"train": 40, "valid": 4, "test": 4})
    cfg = tmp_path / "sig.yaml"
    cfg.write_text(CONFIG.format(corpus=corpus))
    run_dir = tmp_path / "run"

    saved = 0
    for sig in (signal.SIGTERM, signal.SIGHUP):
        proc = _start(cfg, run_dir)
        _wait_training_past(run_dir, saved, proc)  # resumed from the last stop and training
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + sig, (out, err)
        assert f"btm: interrupted ({sig.name})" in err and "Traceback" not in err, err
        assert _stage_pids(run_dir) == []  # the seed stage was stopped and waited for
        # The stage saved on the executor's SIGTERM (exit 3 path); the next run resumes there.
        saved_now = _saved_update(run_dir)
        assert saved_now > saved and {"update": saved_now, "preempted_save": True} in _log(run_dir)
        saved = saved_now
    # Every resume continued after the saved update: each logged interval once, none twice.
    assert _trained(run_dir) == list(range(10, _trained(run_dir)[-1] + 1, 10))

    # SIGKILL: no cleanup can run, the seed stage is orphaned and keeps its unit lock.
    proc = _start(cfg, run_dir)
    _wait_training_past(run_dir, saved, proc)
    (orphan,) = _stage_pids(run_dir)
    proc.kill()
    proc.communicate(timeout=60)
    try:
        again = run_btm("run", cfg, "--run-dir", run_dir, "--no-progress", timeout=300)
        assert again.returncode == 2, again.stdout + again.stderr
        assert "seed of" in again.stderr and "still running in another process" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr
        assert _stage_pids(run_dir) == [orphan]  # nothing started next to it
        # `btm stage` by hand on the same unit is refused by the lock itself.
        by_hand = run_btm("stage", run_dir, "seed", timeout=300)
        assert by_hand.returncode == 2 and "locks/seed.lock" in by_hand.stderr, by_hand.stderr
    finally:
        os.killpg(orphan, signal.SIGTERM)  # the user stops the orphan: it saves and exits 3
        deadline = time.time() + 300
        while _stage_pids(run_dir) and time.time() < deadline:
            time.sleep(0.2)
    assert _stage_pids(run_dir) == []
    assert _trained(run_dir) == list(range(10, _trained(run_dir)[-1] + 1, 10))
    assert {"update": _saved_update(run_dir), "preempted_save": True} in _log(run_dir)
