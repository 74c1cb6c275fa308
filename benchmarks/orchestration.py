"""Orchestration cost of the launcher, measured against the work it orchestrates.

1. Local executor overhead: a pipeline-shaped plan (data -> seed -> train array -> merge ->
   score array -> eval -> report) whose units are subprocesses that each work for
   ``--unit-seconds`` and report their own start/end. Overhead = wall time of the executor
   minus the sum of the units' self-reported durations, run with one worker (so the sum is the
   critical path). Process start-up counts as overhead (pessimistic). Target: <= 5%.
2. Planning cost: ``btm run`` of a finished run directory (plan + record checks, 0 jobs), as a
   fraction of that run's job compute (``jobs/local_run.json``), when ``--finished-run`` is given.
3. sbatch calls per submitted run for N = 2, 4, 8 experts, counted with a fake ``sbatch`` on
   PATH: the number must not grow with N (arrays, not one job per expert).

    python benchmarks/orchestration.py [--unit-seconds 1.0] [--experts 4] [--finished-run DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.executors.local import LocalExecutor  # noqa: E402
from launcher.plan import Job, Unit  # noqa: E402


def synthetic_plan(n_experts: int) -> list[Job]:
    experts = [f"e{i}" for i in range(n_experts)]

    def job(name, units=(None,), ok=(), any_=(), array=False):
        return Job(name=name, stage=name, units=[Unit(u) for u in units], array=array,
                   after_ok=list(ok), after_any=list(any_))

    return [job("data"), job("seed", ok=["data"]), job("train", experts, ok=["seed"], array=True),
            job("merge", any_=["train"]), job("score", experts, ok=["merge"], array=True),
            job("eval", ok=["score"]), job("report", ok=["eval"])]


def local_overhead(tmp: Path, n_experts: int, unit_seconds: float) -> dict:
    log = tmp / "units.jsonl"
    work = textwrap.dedent(f"""
        import json, time
        t0 = time.time()
        while time.time() - t0 < {unit_seconds}:
            pass  # busy, like a real stage
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps({{"start": t0, "end": time.time()}}) + "\\n")
    """)
    jobs = synthetic_plan(n_experts)
    executor = LocalExecutor(tmp, max_workers=1, command_for=lambda job, unit: [sys.executable, "-c", work],
                             progress=False)
    t0 = time.perf_counter()
    result = executor.run(jobs)
    wall = time.perf_counter() - t0
    assert not result.failed, result.failed
    compute = sum(r["end"] - r["start"] for r in map(json.loads, log.read_text().splitlines()))
    return {"units": len(result.units), "wall_s": wall, "compute_s": compute,
            "overhead_s": wall - compute, "overhead_ratio": (wall - compute) / compute}


def planning_cost(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "jobs" / "local_run.json").read_text())
    cfg = run_dir / "config.yaml"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "launcher", "run", str(cfg), "--run-dir", str(run_dir)],
                         cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if "jobs to submit: 0" not in out.stdout:
        raise SystemExit(f"{run_dir} is not a finished run:\n{out.stdout}\n{out.stderr}")
    return {"rerun_wall_s": wall, "run_compute_s": summary["compute_seconds"],
            "ratio": wall / summary["compute_seconds"]}


FAKE_SBATCH = """#!{python}
import os, sys
from pathlib import Path
d = Path(os.environ["FAKE_SLURM_DIR"]); d.mkdir(exist_ok=True)
n = 1000 + len(list(d.iterdir())) + 1
(d / str(n)).write_text(" ".join(sys.argv[1:]))
print(f"Submitted batch job {{n}}")
"""


def sbatch_calls(tmp: Path, n_experts: int) -> dict:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    for tool in ("squeue", "sacct"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    corpus = tmp / f"corpus{n_experts}"
    names = [f"d{i}" for i in range(n_experts)]
    for d in names:
        (corpus / d).mkdir(parents=True, exist_ok=True)
    cfg = tmp / f"n{n_experts}.yaml"
    cfg.write_text(f"name: n{n_experts}\ncorpus: {{path: {corpus}}}\n"
                   f"domains: {{train: [{', '.join(names)}], eval: [d0]}}\nmodel: {{preset: tiny}}\n"
                   "baselines: [dense, random_split]\nexecutor: slurm\nprofile: slurm-test\n")
    calls = tmp / f"sbatch{n_experts}"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(calls),
           "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "launcher", "run", str(cfg), "--run-dir", str(tmp / f"run{n_experts}")],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return {"experts": n_experts, "array_tasks": 2 * n_experts, "sbatch_calls": len(list(calls.iterdir())),
            "submit_wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unit-seconds", type=float, default=1.0)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--finished-run", type=Path, help="a finished local run directory (planning cost)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="btm-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "local").mkdir()
        o = local_overhead(tmp / "local", args.experts, args.unit_seconds)
        print(f"local executor: {o['units']} units x {args.unit_seconds:.1f} s, 1 worker: wall {o['wall_s']:.2f} s, "
              f"compute {o['compute_s']:.2f} s, overhead {o['overhead_s']:.2f} s = {100 * o['overhead_ratio']:.1f}% "
              f"({'OK' if o['overhead_ratio'] <= 0.05 else 'ABOVE'} the 5% target)")
        if args.finished_run:
            p = planning_cost(args.finished_run)
            print(f"re-run of a finished run (plan + record checks, 0 jobs): {p['rerun_wall_s']:.2f} s = "
                  f"{100 * p['ratio']:.1f}% of its {p['run_compute_s']:.0f} s of job compute")
        rows = [sbatch_calls(tmp, n) for n in (2, 4, 8)]
        for r in rows:
            print(f"N={r['experts']} experts ({r['array_tasks']} training array tasks incl. random split): "
                  f"{r['sbatch_calls']} sbatch calls, submitted in {r['submit_wall_s']:.2f} s")
        flat = len({r["sbatch_calls"] for r in rows}) == 1
        print(f"sbatch calls {'do not grow' if flat else 'GROW'} with the number of experts")
    return 0 if o["overhead_ratio"] <= 0.05 and flat else 1


if __name__ == "__main__":
    sys.exit(main())
