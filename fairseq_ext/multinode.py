"""One model on several nodes: srun tasks with env:// initialization, and btm's contract.

``train_lm_srun(spec, nodes, nproc_per_node)`` is what a training stage whose job spans
``nodes`` nodes calls, from the job's batch shell on the first node. It runs one job step

    srun --nodes N --ntasks-per-node P --kill-on-bad-exit=1 ... \\
        python -m fairseq_ext.multinode SPEC.json RESULT.json

N x P tasks, one per GPU (one per node on a CPU cluster), every one a trainer rank: SLURM is
the process manager (``SLURM_PROCID`` -> RANK, ``SLURM_NTASKS`` -> WORLD_SIZE,
``SLURM_LOCALID`` -> LOCAL_RANK), and the ranks meet at ``MASTER_ADDR:MASTER_PORT`` (env://),
rank 0's store on the first node (this host). Why not torchrun with a c10d rendezvous: inside a
SLURM allocation the node list, ranks and process supervision are SLURM's already; an elastic
agent per node would add a second supervisor that swallows the stop signal (SIGUSR2 kills
torchrun's agent, fairseq_ext/multiproc.py) and turns exit statuses into its own. srun passes
SIGUSR2 to every task, ends the step when one task fails (``--kill-on-bad-exit``), and a
requeued job gets a fresh step on whichever nodes it lands.

Stop: SIGUSR2/SIGTERM to this process are passed to srun as SIGUSR2, which signals every
rank; any rank that sees a stop (also a SIGUSR2 sent to one rank on any node) makes all ranks
stop after the same update (``training.preemption.agree_to_stop``), rank 0 saves once, and the
result says ``preempted`` so the stage exits 3 for requeue. Resume is from checkpoint_last,
exact whatever nodes the job gets. No hang: every collective has the process group's timeout
(``BTM_COLLECTIVE_TIMEOUT_S``, fairseq_ext/training/setup.py), so a rank whose peer died
fails within it and the step ends. The spec and result files live in the save directory, on
the filesystem every node shares.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from fairseq_ext.multiproc import stop_requests
from launcher.contract.atomic import atomic_write_json
from launcher.contract.errors import BtmError


def master_port(job_id: str) -> int:
    """A port for rank 0's store derived from the job id: steps of different jobs sharing a
    node do not collide, and a requeued job (same id, nothing else of it running) reuses it."""
    return 20000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def srun_argv(nodes: int, nproc_per_node: int, cpus_per_task: int, spec_path: str, result_path: str,
              python: str = sys.executable) -> list[str]:
    """The job step that starts every rank (pure; the launcher's dry run shows it)."""
    return ["srun", f"--nodes={nodes}", f"--ntasks-per-node={nproc_per_node}",
            f"--cpus-per-task={cpus_per_task}", "--kill-on-bad-exit=1", "--label",
            python, "-u", "-m", "fairseq_ext.multinode", str(spec_path), str(result_path)]


def train_lm_srun(spec, nodes: int, nproc_per_node: int):
    """Train ``spec`` on ``nodes`` x ``nproc_per_node`` ranks of this SLURM job; rank 0's result."""
    from fairseq_ext.train import TrainResult

    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise BtmError(f"training on {nodes} nodes needs a SLURM allocation of them (no SLURM_JOB_ID): "
                       "submit with `btm run --executor slurm`, or train on one node")
    work = Path(spec.save_dir) / f".multinode-{job_id}"
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work / "spec.json", work / "result.json"
    result_path.unlink(missing_ok=True)
    atomic_write_json(spec_path, asdict(spec))
    cpus = max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", "1")) // nproc_per_node)
    env = {**os.environ, "MASTER_ADDR": socket.gethostname(), "MASTER_PORT": str(master_port(job_id))}
    with stop_requests() as stop:
        proc = subprocess.Popen(srun_argv(nodes, nproc_per_node, cpus, str(spec_path), str(result_path)), env=env)
        rc = _wait_passing_stops(proc, stop)
    if not result_path.exists():
        raise BtmError(f"training on {nodes} nodes x {nproc_per_node} processes in {spec.save_dir} failed: "
                       f"srun exited {rc} without a result (the ranks' errors are above)")
    result = TrainResult(**json.loads(result_path.read_text(encoding="utf-8")))
    shutil.rmtree(work)  # the save dir keeps only the trainer's files (kept above on a failure)
    return result


def _wait_passing_stops(proc: subprocess.Popen, stop: list) -> int:
    """Wait for srun; once a stop was requested, pass SIGUSR2 to it every second (srun signals
    every task; a rank still starting ignores it, so it is repeated until the step ends)."""
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if stop:
            proc.send_signal(signal.SIGUSR2)


def slurm_rank_env(environ: dict) -> dict:
    """torch.distributed's env:// variables from the srun task's SLURM ones."""
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ["SLURM_LOCALID"]}


if __name__ == "__main__":
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # until the trainer's StopFlag takes it over
    from fairseq_ext.multiproc import worker_main

    os.environ.update(slurm_rank_env(os.environ))
    sys.exit(worker_main(sys.argv[1:]))
