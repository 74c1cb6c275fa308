"""What SLURM says about jobs and itself: ``sacct``, ``squeue`` and ``scontrol show config``
queried and parsed.

``btm status`` (launcher/status.py), a unit's record (its ``sacct`` accounting, launcher/records.py)
and ``btm run``'s "is this run still queued?" check (launcher/executors/slurm.py) all read the
scheduler through here, and the slurm executor reads the cluster's ``MaxArraySize`` here. The parsers are pure functions of the commands' text output so they are
tested on captured samples.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

SACCT_FORMAT = "JobID,JobName%60,State,ExitCode,ElapsedRaw,TotalCPU,AllocTRES,NodeList"
SQUEUE_FORMAT = "%i|%j|%T|%M|%N|%r"


@dataclass
class SchedulerRow:
    job_id: str  # "123", "123_4" (array task) or "123_[5-7%2]" (pending array tasks)
    name: str
    state: str  # first word, upper case: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...
    exit_code: str = ""
    elapsed_s: int | None = None
    cpu_s: float | None = None
    gpus: int = 0
    nodes: str = ""
    reason: str = ""

    @property
    def gpu_s(self) -> float | None:
        return None if self.elapsed_s is None else self.elapsed_s * self.gpus


def parse_duration(text: str) -> float | None:
    """SLURM durations: ``[D-]HH:MM:SS[.mmm]``, ``MM:SS[.mmm]``, ``INVALID``/empty -> None."""
    text = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", text)
    if not m:
        return None
    days, hours, minutes, seconds = m.groups()
    return int(days or 0) * 86400 + int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)


def parse_tres(text: str) -> dict[str, str]:
    """``billing=2,cpu=2,gres/gpu=1,mem=500M,node=1`` -> dict."""
    out = {}
    for part in text.strip().split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


def _gpus(tres: dict[str, str]) -> int:
    for key in ("gres/gpu", "gpu"):
        if key in tres:
            try:
                return int(tres[key])
            except ValueError:
                return 0
    return 0


def parse_sacct(text: str) -> list[SchedulerRow]:
    """Rows of ``sacct --parsable2 --noheader --format=SACCT_FORMAT``, job steps dropped."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split("|")
        if len(f) < 8:
            continue
        job_id = f[0]
        if "." in job_id:  # 123.batch, 123_4.extern, 123.0: steps of a job
            continue
        elapsed = f[4].strip()
        rows.append(SchedulerRow(
            job_id=job_id, name=f[1].strip(), state=(f[2].split() or [""])[0].upper(),
            exit_code=f[3], elapsed_s=int(elapsed) if elapsed.isdigit() else None,
            cpu_s=parse_duration(f[5]), gpus=_gpus(parse_tres(f[6])), nodes=f[7]))
    return rows


def parse_squeue(text: str) -> list[SchedulerRow]:
    """Rows of ``squeue --noheader --format=SQUEUE_FORMAT``."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split("|")
        if len(f) < 6:
            continue
        elapsed = parse_duration(f[3]) if f[3].count(":") else None
        rows.append(SchedulerRow(job_id=f[0].strip(), name=f[1].strip(), state=f[2].strip().upper(),
                                 elapsed_s=None if elapsed is None else int(elapsed), nodes=f[4].strip(),
                                 reason=f[5].strip()))
    return rows


def expand_array_ids(job_id: str) -> list[str]:
    """``123_[0-2,5%2]`` -> ["123_0", "123_1", "123_2", "123_5"]; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job_id)
    if not m:
        return [job_id]
    base, spec = m.groups()
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += [f"{base}_{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(f"{base}_{part}")
    return out


def rows_by_task(rows: list[SchedulerRow]) -> dict[str, SchedulerRow]:
    """Index rows by job id, expanding pending array ranges; later rows win (requeues)."""
    out = {}
    for r in rows:
        for jid in expand_array_ids(r.job_id):
            out[jid] = r
    return out


def accounting_summary(rows: list[SchedulerRow], job_id: str) -> dict:
    """What a record keeps of sacct's view of one job: elapsed, CPU and GPU seconds."""
    r = rows_by_task(rows).get(job_id) or rows[0]
    return {"job_id": r.job_id, "state": r.state, "elapsed_s": r.elapsed_s, "cpu_s": r.cpu_s,
            "gpus": r.gpus, "gpu_s": r.gpu_s, "nodes": r.nodes}


def live_view(sacct: list[SchedulerRow], squeue: list[SchedulerRow]) -> dict[str, SchedulerRow]:
    """Rows by task id: squeue's while a task is still queued or running (the controller's live
    state; sacct lags it by minutes while slurmdbd catches up, showing RUNNING tasks as PENDING),
    sacct's once it left the queue (squeue forgets finished jobs; sacct keeps exit codes and
    accounting)."""
    out = rows_by_task(sacct)
    out.update(rows_by_task([r for r in squeue if r.state in ACTIVE_STATES]))
    return out


def _output(argv: list[str]) -> str | None:
    """stdout of a SLURM client command; None if it cannot be run or fails (squeue also fails
    when none of the ids is in the queue any more)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def query_scheduler(job_ids: list[str]) -> tuple[str, dict[str, SchedulerRow]]:
    """(source, rows by task id): squeue for the jobs in the queue and sacct for the others
    (``live_view``); whichever of the two answered, or ("records", {}) if neither did."""
    if not job_ids:
        return "records", {}
    ids = ",".join(sorted(set(job_ids)))
    sacct = _output(["sacct", "-j", ids, "--parsable2", "--noheader", f"--format={SACCT_FORMAT}"])
    squeue = _output(["squeue", "--noheader", "-j", ids, f"--format={SQUEUE_FORMAT}"])
    if sacct is None and squeue is None:
        return "records", {}
    source = {(True, True): "squeue (queued jobs) and sacct (finished ones)",
              (True, False): "squeue", (False, True): "sacct"}[(squeue is not None, sacct is not None)]
    return source, live_view(parse_sacct(sacct or ""), parse_squeue(squeue or ""))


ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED")


def active_job_ids(job_ids: list[str]) -> list[str]:
    """Those of ``job_ids`` (or their array tasks) still pending or running, per squeue; [] when
    squeue cannot be run."""
    if not job_ids:
        return []
    try:
        out = subprocess.run(["squeue", "--noheader", "-j", ",".join(sorted(set(job_ids))),
                              f"--format={SQUEUE_FORMAT}"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [r.job_id for r in parse_squeue(out.stdout) if r.state in ACTIVE_STATES]


def sacct_accounting(job_id: str) -> dict | None:
    """Elapsed, CPU time and GPU time (from TRES) of a SLURM job, as sacct reports them now."""
    try:
        out = subprocess.run(["sacct", "-j", job_id, "--parsable2", "--noheader",
                              f"--format={SACCT_FORMAT}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = parse_sacct(out.stdout)
    return accounting_summary(rows, job_id) if rows else None


def parse_max_array_size(text: str) -> int | None:
    """``MaxArraySize = 1001`` from ``scontrol show config`` output; None when absent."""
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", text, re.M)
    return int(m.group(1)) if m else None


def max_array_size() -> int | None:
    """The cluster's MaxArraySize (an array's indices must stay below it), per ``scontrol show
    config``; None when scontrol cannot be run or does not say (nothing is split then, and
    sbatch names the limit if one is hit)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_max_array_size(out.stdout) if out.returncode == 0 else None
