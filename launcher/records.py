"""Completion records: ``RUN_DIR/records/<stage>[.<unit>].json``.

A unit is done when its record exists, was written for the same unit parameters (``spec_hash``)
and the sha256 of every recorded input and output still matches the file on disk. Nothing else
(no log, no queue state) says a unit is done.

Record: ``{stage, unit, config_hash, spec_hash, inputs: {path: sha256}, outputs: {path:
sha256}, kept: [path], versions, git_commit, started, finished, host, slurm: {...}, sacct: {...}}``; paths
inside the run directory are relative to it. ``kept``: outputs that other verbs edit later
(forest.json), so only their existence is checked.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from launcher.contract.atomic import atomic_write_json, sha256_file
from launcher.contract.errors import BtmError
from launcher.contract.layout import RunLayout
from launcher.scheduler import sacct_accounting

VERSIONED_PACKAGES = ("btm", "torch", "fairseq-fixed", "numpy", "sentencepiece", "submitit", "pandas")


def record_path(run_dir: str | Path, stage: str, unit: str | None) -> Path:
    return RunLayout(run_dir).record(stage, unit)


def spec_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class HashCache:
    """sha256 of files, cached by (size, mtime_ns) in ``records/.hashes.json``.

    Planning checks every recorded input and output; re-hashing multi-GB checkpoints and data
    each time would dominate a re-run. A changed file changes its mtime, so the cache is safe.

    The cache is derived from the files on disk, so an unreadable one costs only time: it is
    rebuilt (every recorded file hashed again) with a warning naming it, never trusted in part.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = RunLayout(run_dir).records / ".hashes.json"
        self.dirty = False
        self.entries = self._load()

    def _load(self) -> dict:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            return self._rebuild(f"cannot be read ({e})")
        well_formed = isinstance(entries, dict) and all(
            isinstance(v, list) and len(v) == 3 and isinstance(v[0], int) and isinstance(v[1], int)
            and isinstance(v[2], str) for v in entries.values())
        return entries if well_formed else self._rebuild("is not a map of path -> [size, mtime_ns, sha256]")

    def _rebuild(self, why: str) -> dict:
        print(f"btm: warning: hash cache {self.path} {why}; rebuilding it (every recorded file is "
              "hashed again)", file=sys.stderr)
        self.dirty = True  # the next save() replaces the bad file even if nothing new is hashed
        return {}

    def rel(self, path: str | Path) -> str:
        p = Path(path)
        if not p.is_absolute():
            return str(p)
        try:
            return str(p.resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(p)

    def abs(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.run_dir / p

    def sha256(self, path: str | Path) -> str | None:
        """The file's sha256, or None when it does not exist."""
        rel = self.rel(path)
        p = self.abs(rel)
        try:
            st = p.stat()
        except OSError:
            return None
        key = [st.st_size, st.st_mtime_ns]
        hit = self.entries.get(rel)
        if hit and hit[:2] == key:
            return hit[2]
        digest = sha256_file(p)
        self.entries[rel] = [*key, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            atomic_write_json(self.path, self.entries)
            self.dirty = False


def hash_files(cache: HashCache, paths) -> dict[str, str | None]:
    return {cache.rel(p): cache.sha256(p) for p in paths}


def read_record(run_dir: str | Path, stage: str, unit: str | None) -> dict | None:
    """The unit's record; None when there is none yet (not done). A record btm cannot read is an
    error: records are written atomically, so a corrupt one was damaged after the fact, and
    treating it as "not done" would silently redo (and overwrite) finished work."""
    path = record_path(run_dir, stage, unit)
    what_to_do = f"delete it to run {stage}{f' {unit}' if unit else ''} again"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BtmError(f"completion record {path} cannot be read ({e}); {what_to_do}") from None
    if not isinstance(record, dict) or record.get("stage") != stage:
        raise BtmError(f"completion record {path} is not a btm record of stage {stage!r}; {what_to_do}")
    return record


def record_is_current(record: dict | None, params: dict, cache: HashCache) -> bool:
    if not record or record.get("spec_hash") != spec_hash(params):
        return False
    for files in (record.get("inputs", {}), record.get("outputs", {})):
        for path, digest in files.items():
            if cache.sha256(path) != digest:
                return False
    return all(cache.abs(path).exists() for path in record.get("kept", []))


def is_done(run_dir: str | Path, stage: str, unit, cache: HashCache | None = None) -> bool:
    cache = cache or HashCache(run_dir)
    return record_is_current(read_record(run_dir, stage, unit.name), unit.params, cache)


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import platform

    out["python"] = platform.python_version()
    return out


def slurm_environment() -> dict | None:
    if "SLURM_JOB_ID" not in os.environ:
        return None
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
            "SLURM_RESTART_COUNT", "SLURM_JOB_PARTITION")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


def write_record(run_dir: str | Path, stage: str, unit: str | None, *, params: dict, config_hash: str,
                 inputs: dict[str, str | None], outputs: dict[str, str | None], started: str,
                 extra: dict | None = None, config: dict | None = None, kept: list[str] = ()) -> dict:
    slurm = slurm_environment()
    job_id = None
    if slurm:
        job_id = (f"{slurm['slurm_array_job_id']}_{slurm['slurm_array_task_id']}"
                  if "slurm_array_job_id" in slurm else slurm["slurm_job_id"])
    record = {
        "stage": stage, "unit": unit, "config_hash": config_hash, "config": config,
        "spec_hash": spec_hash(params),
        "params": params, "inputs": inputs, "outputs": outputs, "kept": list(kept), "versions": package_versions(),
        "git_commit": git_commit(), "started": started, "finished": now(), "host": socket.gethostname(),
        "slurm": slurm, "sacct": sacct_accounting(job_id) if job_id else None, **(extra or {}),
    }
    atomic_write_json(record_path(run_dir, stage, unit), record)
    return record
