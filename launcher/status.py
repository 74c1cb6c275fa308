"""``btm status``: one row per stage and unit, from the scheduler and the records.

State comes from ``squeue`` for jobs still in the queue (the live state) and ``sacct`` for
finished ones (launcher/scheduler.py queries and parses both, ``live_view`` joins them), and
from the completion records; never from logs.
"""
from __future__ import annotations

from pathlib import Path

from launcher.records import read_record
from launcher.scheduler import SchedulerRow


def _fmt_s(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def status_rows(run_dir: str | Path, plan, submissions: list[dict], scheduler: dict[str, SchedulerRow]) -> list[tuple]:
    """(job, stage, unit, record, scheduler state, job id, elapsed, nodes) for every unit."""
    latest: dict[tuple[str, str | None], str] = {}  # (job name, unit) -> scheduler task id
    for sub in submissions:
        if not sub.get("job_id"):
            continue
        for i, unit in enumerate(sub["units"]):
            latest[(sub["job"], unit)] = f"{sub['job_id']}_{i}" if sub.get("array") else str(sub["job_id"])
    rows = []
    for job in plan.jobs:
        for unit in job.units:
            rec = read_record(run_dir, job.stage, unit.name)
            done = "done" if unit.name in job.done else ("stale" if rec else "-")
            jid = latest.get((job.name, unit.name))
            srow = scheduler.get(jid) if jid else None
            elapsed = srow.elapsed_s if srow else (rec.get("sacct") or {}).get("elapsed_s") if rec else None
            rows.append((job.name, job.stage, unit.name or "-", done, srow.state if srow else "-",
                         jid or "-", _fmt_s(elapsed), srow.nodes if srow else "-"))
    return rows


def format_table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header).rstrip(), *(fmt.format(*map(str, r)).rstrip() for r in rows)]) + "\n"
