"""The submission ledger ``RUN_DIR/jobs/submissions.json``: every SLURM job a run submitted.

One row per sbatch call: ``{job, stage, job_id, array, units, submitted, executor}``; ``units``
lists the unit each array index runs. ``btm status`` joins it with sacct/squeue, ``btm cancel``
scancels its ids, and ``btm run`` refuses to submit while any of them is still queued.

No file yet means no jobs yet. A file that exists but cannot be read is an error, never "no
jobs": reading it as empty would make ``btm cancel`` cancel nothing and let the next submission
overwrite the only list of the run's jobs.
"""
from __future__ import annotations

import json
from pathlib import Path

from launcher.contract.atomic import atomic_write_json
from launcher.contract.errors import BtmError
from launcher.contract.layout import RunLayout

ROW_KEYS = ("job", "job_id", "array", "units")


def read_submissions(run_dir: str | Path) -> list[dict]:
    path = RunLayout(run_dir).submissions
    what_to_do = ("it lists the SLURM jobs this run submitted; restore it, or check the run's jobs "
                  "with `squeue --me`, scancel any still queued by hand and delete the file")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise BtmError(f"job ledger {path} cannot be read ({e}): {what_to_do}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in ROW_KEYS)
                                             for r in rows):
        raise BtmError(f"job ledger {path} is not a list of submissions (each with "
                       f"{', '.join(ROW_KEYS)}): {what_to_do}")
    return rows


def submitted_job_ids(run_dir: str | Path) -> list[str]:
    return sorted({str(row["job_id"]) for row in read_submissions(run_dir) if row.get("job_id")})


def write_submissions(run_dir: str | Path, rows: list[dict]) -> None:
    atomic_write_json(RunLayout(run_dir).submissions, rows)
