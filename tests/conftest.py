"""Shared test helpers.

Tests that need a real part (fairseq, the SLURM test cluster) call ``require(...)``: on a
developer machine a missing part skips the test, but under CI=true it fails, so a green CI
never hides a skipped check.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The SLURM test cluster fixtures (`slurm_cluster`) live in tests/slurm_testcluster.py.
pytest_plugins = ["slurm_testcluster"]

# One torch/OpenMP thread for the tests and every process they start (btm stages, sbatch jobs
# export it too), set before anything imports torch. The models are tiny, and on the shared
# 2-core CI machine two intra-op threads wait on each other whenever the other core is busy:
# 12 tiny updates took 4.1 s with 2 threads and 0.6 s with 1 on the loaded machine. Nothing
# the tests check depends on the thread count; an exported value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    """../shared beside the checkout (CI), or beside an ancestor (a git worktree)."""
    if os.environ.get("BTM_SHARED"):
        return Path(os.environ["BTM_SHARED"])
    for parent in REPO.parents:
        if (parent / "shared" / "corpus").is_dir():
            return parent / "shared"
    return REPO.parent / "shared"


SHARED = _find_shared()
CORPUS = SHARED / "corpus"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required part missing under CI=true: {reason}")
    pytest.skip(reason)


def require_fairseq() -> None:
    ok = all(importlib.util.find_spec(m) is not None for m in ("torch", "fairseq", "sentencepiece"))
    require(ok, "torch, fairseq and sentencepiece are not installed (run scripts/setup_env.sh)")


def run_btm(*args: str, cwd: Path | None = None, check: bool = False, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI of *this* checkout (not whatever `btm` is on PATH) in a subprocess."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"btm {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def write_small_corpus(out: Path, domains: list[str], docs_per_split: dict[str, int],
                       max_chars: int = 4000) -> Path:
    """Copy the first documents of some ../shared/corpus domains into a small test corpus."""
    require(CORPUS.is_dir(), f"development corpus not found at {CORPUS}")
    for domain in domains:
        (out / domain).mkdir(parents=True, exist_ok=True)
        for split, n in docs_per_split.items():
            rows = []
            with gzip.open(CORPUS / domain / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["text"][:max_chars]
                    if text.strip():
                        rows.append(json.dumps({"text": text}))
                    if len(rows) == n:
                        break
            (out / domain / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


# The development corpus's eight domains: the paper configs name no domains and take every
# domain folder of the corpus they are given.
PAPER_DOMAINS = ["bible", "code_python", "dictionary", "encyclopedia", "fiction", "kernel_docs", "legal", "quotes"]


@pytest.fixture(scope="session")
def paper_corpus(tmp_path_factory) -> Path:
    """A corpus of the paper's eight domain folders, for planning (nothing in them is read)."""
    root = tmp_path_factory.mktemp("paper_corpus")
    for d in PAPER_DOMAINS:
        (root / d).mkdir()
    return root


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Three real domains, small enough that tiny models train on it in seconds."""
    return write_small_corpus(tmp_path_factory.mktemp("corpus"), ["bible", "code_python", "legal"],
                              {"train": 60, "valid": 8, "test": 8})
