"""btm verbs: run, status, cancel, stage (the pipeline)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from launcher.contract.errors import BtmError, shown
from launcher.interrupts import ends_like_ctrl_c
from launcher.user_yaml import load_bounded

# Keys that define what a run trains; a run directory refuses a config that changes them.
DEMO_CORPUS_CHARS = 300_000  # per domain: enough for tiny experts, quick to build and tokenize
FIXED_KEYS = ("name", "method", "corpus", "model", "budget", "clusters", "seed")


def add_executor_overrides(p: argparse.ArgumentParser) -> None:
    """--executor, --profile, --max-parallel: the flags every verb that submits jobs shares."""
    p.add_argument("--executor", choices=["local", "slurm"], help="override the config's executor")
    p.add_argument("--profile", help="override the config's cluster profile")
    p.add_argument("--max-parallel", type=int, help="override max_parallel (array %%K, local workers)")


def register(subparsers):
    p = subparsers.add_parser(
        "run", help="plan and run (or submit) the whole pipeline of a config",
        description="Plan the whole BTM pipeline of CONFIG (a YAML file or a named config) in RUN_DIR and "
                    "run it locally or submit it to SLURM at once (afterok chains). Running again submits "
                    "only what is missing; listing extra training domains against an existing run adds "
                    "them to its forest (incremental BTM).")
    p.add_argument("config", nargs="?", help="config file or named config (tiny, demo, paper-125m, ...); "
                                             "with --demo: the run directory")
    p.add_argument("--run-dir", help="run directory (created if missing)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan (jobs, arrays, dependencies, resources, budget) and stop")
    mode.add_argument("--check", action="store_true", help="validate every job script with `sbatch --test-only` and stop")
    p.add_argument("--demo", action="store_true", help="build the embedded demo corpus and run the `demo` config locally")
    p.add_argument("--corpus", help="corpus directory (overrides corpus.path)")
    add_executor_overrides(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="override one config key (dotted, e.g. budget.seed_fraction=0.3 or name=sf30; "
                        "VALUE is read as YAML); repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (local executor)")
    p.set_defaults(func=cmd_run)

    s = subparsers.add_parser("status", help="state of every stage and expert of a run",
                              description="One row per stage and unit: the record (done/-), and the scheduler's view: "
                                          "squeue's live state for jobs still in the queue, sacct's for finished ones.")
    s.add_argument("run_dir", help="run directory")
    s.set_defaults(func=cmd_status)

    c = subparsers.add_parser("cancel", help="cancel a run's SLURM jobs",
                              description="scancel every job this run submitted (from jobs/submissions.json).")
    c.add_argument("run_dir", help="run directory")
    c.set_defaults(func=cmd_cancel)

    from launcher.stages import STAGES  # the registry (no torch/fairseq at import)

    st = subparsers.add_parser("stage", help="run one unit of one stage (what every job runs)",
                               description="Run one unit of one stage of a run: checks its record, does the work, "
                                           "writes the record. Exit 3 means 'saved my state, requeue me'.")
    st.add_argument("run_dir", help="run directory")
    st.add_argument("stage", help=", ".join(stage.name for stage in STAGES))
    st.add_argument("--unit", help="unit name (an expert, a score unit's model); each array task "
                                   "is submitted with its own --unit")
    st.add_argument("--force", action="store_true", help="run even if the record is current")
    st.add_argument("--nproc-per-node", type=int, default=1,
                    help="training stages: train on N processes of this node, one per GPU (torchrun)")
    st.add_argument("--nodes", type=int, default=1,
                    help="training stages: train on N nodes of this SLURM job, --nproc-per-node ranks each (srun)")
    st.set_defaults(func=cmd_stage)


# ---- run --------------------------------------------------------------------------------------

def parse_setting(text: str) -> tuple[str, object]:
    """``--set KEY=VALUE``: a dotted config key and its value read as a YAML scalar or list."""
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]+(\.[A-Za-z_]+)*", key):
        raise BtmError(f"--set {shown(text)}: expected KEY=VALUE with a dotted config key, e.g. budget.seed_fraction=0.3")
    return key, load_bounded(value, f"--set {key}")[0]


def _overrides(args) -> dict:
    out = dict(parse_setting(s) for s in getattr(args, "settings", []))
    if args.executor:
        out["executor"] = args.executor
    if args.profile:
        out["profile"] = args.profile
    if args.max_parallel is not None:
        out["max_parallel"] = args.max_parallel
    return out


def reconcile(old, new):
    """The config to run in a directory that already holds ``old``.

    Training-defining keys must not change. Training domains added to the list become
    incremental domains (branched from the existing forest) instead of retraining everything.
    """
    o, n = old.to_dict(), new.to_dict()
    for key in FIXED_KEYS:
        if o[key] != n[key]:
            raise BtmError(f"{new.source}: {key} differs from the config of this run directory "
                           f"({shown(o[key])} there, {shown(n[key])} here); use a new --run-dir")
    removed = [d for d in old.domains.train if d not in new.domains.train]
    if removed:
        raise BtmError(f"{new.source}: domains.train drops {', '.join(removed)} of the existing run; "
                       "remove experts with `btm forest remove` instead")
    added = [d for d in new.domains.train if d not in old.domains.train]
    if added:
        new.domains.train = list(old.domains.train)
        new.domains.incremental = [*new.domains.incremental, *[d for d in added if d not in new.domains.incremental]]
        print(f"btm: adding {', '.join(added)} to the existing forest (incremental, branching: {new.branching.rule})")
    dropped_inc = [d for d in old.domains.incremental if d not in new.domains.incremental]
    new.domains.incremental = [*dropped_inc, *new.domains.incremental]
    return new


def _prepare(args):
    from launcher.config import load_config
    from launcher.contract.atomic import check_output_dir
    from launcher.stages import load_run_config

    # Stage commands run with the run directory as their working directory, so every path that
    # reaches them (run dir, corpus) must be absolute.
    if args.corpus is not None:
        args.corpus = str(Path(args.corpus).resolve())
    if args.demo:
        run_dir = check_output_dir(Path(args.run_dir or args.config or "btm-demo").resolve(), "run directory")
        corpus = args.corpus
        if corpus is None:
            from launcher.demo_corpus import build_demo_corpus

            corpus = run_dir / "demo_corpus"
            if not corpus.is_dir():
                print(f"building the demo corpus in {corpus}")
                build_demo_corpus(corpus, size=DEMO_CORPUS_CHARS)
        cfg = load_config("demo", _overrides(args) | {"executor": "local"}, corpus=corpus)
    else:
        if not args.config:
            raise BtmError("btm run needs a CONFIG (file or named config), or --demo")
        if not args.run_dir:
            raise BtmError("btm run needs --run-dir DIR")
        run_dir = check_output_dir(Path(args.run_dir).resolve(), "--run-dir")
        cfg = load_config(args.config, _overrides(args), corpus=args.corpus)
    if (run_dir / "config.yaml").is_file():
        cfg = reconcile(load_run_config(run_dir), cfg)
    if not cfg.corpus.path:
        raise BtmError(f"{cfg.source}: corpus.path is not set; pass --corpus DIR")
    if not Path(cfg.corpus.path).is_dir():
        raise BtmError(f"{cfg.source}: corpus.path: {cfg.corpus.path} is not a directory")
    return cfg, run_dir


def make_plan(cfg, run_dir: Path):
    from launcher.plan import build_plan
    from launcher.profiles import load_profile
    from launcher.records import HashCache, is_done

    profile = load_profile(cfg.profile)
    cache = HashCache(run_dir)
    plan = build_plan(cfg, profile, str(run_dir), lambda stage, unit: is_done(run_dir, stage, unit, cache))
    if run_dir.is_dir() and (run_dir / "records").is_dir():
        cache.save()
    return plan


def _sbatch_context(plan):
    from launcher.sbatch import SbatchContext

    return SbatchContext(run_dir=str(Path(plan.run_dir).resolve()), run_name=plan.config.name,
                         array_parallelism=plan.config.max_parallel)


@ends_like_ctrl_c
def cmd_run(args) -> int:
    from launcher.contract.atomic import atomic_write_text
    from launcher.lock import run_lock
    from launcher.plan import format_plan

    cfg, run_dir = _prepare(args)
    if args.dry_run:
        print(format_plan(make_plan(cfg, run_dir)), end="")
        return 0
    if args.check:
        from launcher.executors.slurm import check

        plan = make_plan(cfg, run_dir)
        problems = check(plan.to_submit, plan.profile, _sbatch_context(plan))
        for p in problems:
            print(f"btm: sbatch --test-only: {p}", file=sys.stderr)
        return 1 if problems else 0
    with run_lock(run_dir):
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        plan = make_plan(cfg, run_dir)
        jobs = plan.to_submit
        print(format_plan(plan), end="")
        if not jobs:
            print("nothing to do: every stage of this run is done")
            _print_results(run_dir)
            return 0
        if cfg.executor == "slurm":
            from launcher.executors.slurm import active_jobs, submit

            active = active_jobs(run_dir)
            if active:
                raise BtmError(f"{run_dir} still has queued or running jobs ({', '.join(active[:5])}); "
                               "wait for them or `btm cancel` first")
            rows = submit(jobs, plan.profile, _sbatch_context(plan))
            print(f"submitted {len(rows)} jobs; follow with `btm status {run_dir}`")
            return 0
        from launcher.executors.local import LocalExecutor
        from launcher.lock import refuse_running_units

        refuse_running_units(run_dir, [(job.stage, u.name) for job in jobs for u in job.units])
        result = LocalExecutor(run_dir, cfg.max_parallel, progress=not args.no_progress).run(jobs)
        _write_local_summary(run_dir, result)
        if result.failed:
            names = [f"{u.job}:{u.unit}" if u.unit else u.job for u in result.failed]
            print(f"btm: {len(names)} unit(s) did not finish: {', '.join(names)}; "
                  f"logs in {run_dir / 'jobs' / 'logs'}; run again to retry only those", file=sys.stderr)
            return 1
        _print_results(run_dir)
        return 0


def _write_local_summary(run_dir: Path, result) -> None:
    from dataclasses import asdict

    from launcher.contract.atomic import atomic_write_json

    atomic_write_json(run_dir / "jobs" / "local_run.json",
                      {"wall_seconds": result.wall_seconds, "compute_seconds": result.compute_seconds,
                       "units": [asdict(u) for u in result.units]})


def _print_results(run_dir: Path) -> None:
    from launcher.contract.layout import RunLayout
    from launcher.contract.results import read_results

    csv = RunLayout(run_dir).results / "results.csv"
    if not csv.is_file():
        return
    df = read_results(run_dir)
    table = df.pivot_table(index="method", columns="eval_domain", values="ppl", aggfunc="last")
    print("\nperplexity (lower is better):")
    print(table.round(2).to_string())
    report = run_dir / "report" / "report.md"
    print(f"\nresults: {csv}" + (f"\nreport: {report}" if report.is_file() else ""))


# ---- status, cancel, stage ---------------------------------------------------------------------

def cmd_status(args) -> int:
    from launcher.ledger import read_submissions
    from launcher.scheduler import query_scheduler
    from launcher.stages import load_run_config
    from launcher.status import format_table, status_rows

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    plan = make_plan(cfg, run_dir)
    subs = read_submissions(run_dir)
    ids = [s["job_id"] for s in subs if s.get("job_id")]
    source, sched = query_scheduler(ids)
    rows = status_rows(run_dir, plan, subs, sched)
    header = ("job", "stage", "unit", "record", "scheduler", "job id", "elapsed", "nodes")
    print(format_table(header, rows), end="")
    done = sum(1 for r in rows if r[3] == "done")
    print(f"{done}/{len(rows)} units done; scheduler state from {source}")
    return 0


def cmd_cancel(args) -> int:
    from launcher.executors.slurm import cancel

    ids = cancel(args.run_dir)
    print(f"cancelled {len(ids)} job(s): {', '.join(ids)}" if ids else "no submitted SLURM jobs to cancel")
    return 0


def cmd_stage(args) -> int:
    from launcher.stages import run_stage

    return run_stage(args.run_dir, args.stage, args.unit, force=args.force, nproc=args.nproc_per_node,
                     nodes=args.nodes)
