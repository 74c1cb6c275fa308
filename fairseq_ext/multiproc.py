"""One model on several GPUs of one node: torchrun around the lean trainer, with btm's contract.

``train_lm_torchrun(spec, nproc)`` is what ``btm train/seed --nproc-per-node N`` and the
training stages of a job with N > 1 GPUs per task call. It runs

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m fairseq_ext.multiproc SPEC.json RESULT.json

(``torchrun`` by another name, so no PATH lookup): N workers, one DDP group on this node
(nccl on GPUs, gloo on CPU), each calling ``train_lm`` (fairseq_ext/train.py says how the ranks
split a batch, agree to stop and leave checkpoints to rank 0). Rank 0 writes the
``TrainResult`` to RESULT.json; every worker exits 0 when training returned, preempted or not.

Why a parent around torchrun rather than ``exec torchrun``: torchrun alone cannot keep the
"SIGUSR2 -> save -> exit 3" contract. SIGUSR2 is not among the signals it handles by default
(it would kill the agent and orphan the workers), the signals it does handle reach the
workers with a SIGKILL 30 s later (too short to validate and save a large model), and a
worker's exit status 3 comes out of torchrun as a failure (1). So this process starts torchrun
with SIGUSR2 ignored, forwards SIGUSR2/SIGTERM as SIGUSR2 straight to the workers (torchrun
starts each in its own session, so they are found as its children in /proc), repeats the
forward until they are gone (a worker still importing torch ignores it), and reads the
outcome from RESULT.json: preempted is returned like ``train_lm``'s, so callers exit 3.

The forward alone could lose a stop: a worker that installs its handler just after one forward
may finish a short run before the next. So the stop is also recorded: on the signal this
process creates the stop file the workers find through ``$BTM_STOP_FILE`` (checked after every
update, fairseq_ext/training/preemption.py); whenever in the start the signal came, training
stops after its first update at the latest and saves. ``$BTM_TEST_WORKER_START_DELAY_S`` makes
each worker sleep before training, so a test can hit that window every time, not by luck.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from fairseq_ext.training.preemption import STOP_FILE_ENV
from launcher.contract.atomic import atomic_write_json
from launcher.contract.errors import BtmError

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def torchrun_argv(nproc: int, spec_path: str, result_path: str,
                  python: str = sys.executable) -> list[str]:
    """The command that starts the workers (pure; the launcher's tests read it)."""
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "fairseq_ext.multiproc", str(spec_path), str(result_path)]


def train_lm_torchrun(spec, nproc: int):
    """Train ``spec`` on ``nproc`` processes of this node; returns rank 0's ``TrainResult``."""
    from fairseq_ext.train import TrainResult

    if nproc < 1:
        raise BtmError(f"--nproc-per-node must be >= 1, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="btm-torchrun-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        atomic_write_json(spec_path, asdict(spec))
        stop_file = Path(tmp) / "stop"
        with stop_requests(stop_file) as stop:  # before the start: no window where SIGUSR2 kills us
            proc = subprocess.Popen(torchrun_argv(nproc, str(spec_path), str(result_path)),
                                    preexec_fn=_ignore_sigusr2, env={**os.environ, STOP_FILE_ENV: str(stop_file)})
            rc = _wait_forwarding(proc, stop)
        if not result_path.exists():
            raise BtmError(f"training on {nproc} processes in {spec.save_dir} failed: torchrun "
                           f"exited {rc} without a result (the workers' errors are above)")
        return TrainResult(**json.loads(result_path.read_text(encoding="utf-8")))


def _ignore_sigusr2() -> None:  # runs in the child before exec; SIG_IGN survives exec
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@contextlib.contextmanager
def stop_requests(stop_file: Path | None = None):
    """A list that SIGUSR2/SIGTERM append to while the block runs (main thread only); the first
    one also creates ``stop_file`` (if given) for workers that read it."""
    stop, old = [], {}

    def request(signum, frame):
        if stop_file is not None:
            stop_file.touch()
        stop.append(signum)

    for sig in STOP_SIGNALS:
        try:
            old[sig] = signal.signal(sig, request)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _wait_forwarding(proc: subprocess.Popen, stop: list) -> int:
    """Wait for torchrun; once a stop was requested, pass SIGUSR2 to its workers every second."""
    have_proc = os.path.isdir("/proc")
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if stop and have_proc:
            for pid in children(proc.pid):
                _kill(pid, signal.SIGUSR2)
        elif stop:  # no /proc to find the workers: torchrun passes SIGTERM on (30 s grace)
            proc.send_signal(signal.SIGTERM)
            stop.clear()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from Linux's /proc)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name in () may hold spaces
        except (OSError, IndexError):
            continue  # gone meanwhile
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def worker_main(argv: list[str]) -> int:
    """One torchrun worker: ``python -m fairseq_ext.multiproc SPEC.json RESULT.json``."""
    from fairseq_ext.train import TrainSpec, end_process_group, train_lm

    spec_path, result_path = argv
    spec = TrainSpec.from_dict(json.loads(Path(spec_path).read_text(encoding="utf-8")))
    time.sleep(float(os.environ.get("BTM_TEST_WORKER_START_DELAY_S", "0")))  # tests: a wide start window
    try:
        result = train_lm(spec)
        if int(os.environ.get("RANK", 0)) == 0:
            atomic_write_json(result_path, asdict(result))
    except BtmError as e:
        print(f"btm: error (rank {os.environ.get('RANK', 0)}): {e}", file=sys.stderr)
        return 2
    end_process_group()  # after rank 0's write: no rank exits (and gets torchrun to kill) early
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
