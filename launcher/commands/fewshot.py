"""btm verbs: ``btm fewshot run CONFIG --run-dir RUN`` (one array over task x seed x method) and
``btm fewshot element MANIFEST --index I`` (what each array element runs). See docs/fewshot.md
and launcher/stages/fewshot.py; lm_eval, torch and fairseq are imported only by ``element``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from launcher.commands.run import add_executor_overrides
from launcher.contract.errors import BtmError, shown


def register(subparsers) -> None:
    fs = subparsers.add_parser(
        "fewshot", help="few-shot tasks through lm-evaluation-harness: one array over (task, seed, method)",
        description="Run a few-shot config (docs/fewshot.md) on a forest as one array job, locally or on "
                    "SLURM; results join RUN/results/fewshot.{csv,parquet} and `btm report`.")
    fs.set_defaults(func=_no_subcommand)
    sub = fs.add_subparsers(dest="fewshot_command", metavar="SUBCOMMAND")
    r = sub.add_parser(
        "run", help="run (or submit) every (task, seed, method) element not done yet",
        description="Expand CONFIG into (task, seed, method) elements, write the pending ones to "
                    "RUN/fewshot/<name>/manifest-<hash>.json and run them as ONE array job (local "
                    "subprocesses, or one sbatch --array through submitit). Running it again runs only "
                    "elements that are missing or whose settings changed.")
    r.add_argument("config", help="few-shot config YAML, or a name in examples/fewshot/ (paper, local)")
    r.add_argument("--run-dir", required=True, help="the run whose forest is evaluated; relative model paths "
                                                    "resolve against it and results go to RUN/results/fewshot.*")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the elements and the sbatch script; write nothing")
    mode.add_argument("--check", action="store_true", help="validate the array script with `sbatch --test-only`")
    add_executor_overrides(r)
    r.add_argument("--limit", type=float, help="override limit: documents per task (< 1: a fraction)")
    r.add_argument("--metadata", help="JSON merged into the config's lm-eval task metadata, e.g. "
                                      "'{\"corpus\": \"/data/corpus\"}' for the local tasks")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (local executor)")
    r.set_defaults(func=cmd_run)
    e = sub.add_parser("element", help="run one element of a manifest (what each array element runs)",
                       description="Evaluate one (task, seed, method) element of a few-shot manifest and "
                                   "append its rows to the few-shot results table.")
    e.add_argument("manifest", help="RUN/fewshot/<name>/manifest-<hash>.json")
    e.add_argument("--index", type=int, required=True, help="the element's index in the manifest")
    e.set_defaults(func=cmd_element)


def _no_subcommand(args) -> int:
    raise BtmError("'btm fewshot' needs a sub-command: run or element (see btm fewshot --help)")


def _config(args):
    from launcher.stages.fewshot import load_config

    cfg = load_config(args.config)
    for key in ("executor", "profile", "max_parallel"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.limit is not None:
        cfg.limit = int(args.limit) if args.limit >= 1 else args.limit
    if args.metadata:
        try:
            extra = json.loads(args.metadata)
        except ValueError as e:
            raise BtmError(f"--metadata is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise BtmError(f"--metadata must be a JSON object, got {shown(args.metadata)}")
        cfg.metadata = {**cfg.metadata, **extra}
    return cfg


def cmd_run(args) -> int:
    from launcher.stages import fewshot
    from launcher.profiles import load_profile
    from launcher.sbatch import SbatchContext, format_tasks, submission

    cfg = _config(args)
    run_dir = Path(args.run_dir).resolve()
    if not run_dir.is_dir():
        raise BtmError(f"run directory {run_dir} does not exist")
    out_dir = fewshot.fewshot_dir(run_dir, cfg)
    every = fewshot.elements(cfg, run_dir)
    pending = [e for e in every if not fewshot.is_done(out_dir, e)]
    print(f"few-shot {cfg.name!r}: {len(cfg.tasks)} task(s) x {len(cfg.seeds)} seed(s) x {len(cfg.methods)} "
          f"method(s) = {len(every)} elements; {len(every) - len(pending)} done, {len(pending)} to run")
    if not pending:
        print(f"nothing to do; results in {run_dir / 'results' / 'fewshot.csv'}")
        return 0
    profile = load_profile(cfg.profile)
    manifest, _ = fewshot.write_manifest(out_dir, pending, write=not (args.dry_run or args.check))
    job = fewshot.fewshot_job([e["id"] for e in pending], profile)
    ctx = SbatchContext(run_dir=str(out_dir), run_name=cfg.name, array_parallelism=cfg.max_parallel)
    index = {e["id"]: i for i, e in enumerate(pending)}

    def element_argv(job, unit: str) -> list[str]:  # the command each array task's payload runs
        return fewshot.element_argv(manifest, index[unit])

    if args.dry_run:
        for i, e in enumerate(pending):
            print(f"  {i:>4}  {e['id']}")
        print(f"manifest: {manifest} (not written: --dry-run)\n")
        sub = submission(job, profile, ctx, element_argv)
        print(sub.script, end="")
        print("\n# each array task runs `python -u -m launcher` with:\n" + format_tasks(sub), end="")
        return 0
    if args.check:
        from launcher.executors.slurm import check

        problems = check([job], profile, ctx, element_argv)
        for p in problems:
            print(f"btm: sbatch --test-only: {p}", file=sys.stderr)
        return 1 if problems else 0
    if cfg.executor == "slurm":
        from launcher.executors.slurm import active_jobs, submit

        active = active_jobs(out_dir)
        if active:
            raise BtmError(f"few-shot {shown(cfg.name)} still has queued or running jobs ({', '.join(active[:5])}); "
                           f"wait for them or `btm cancel {out_dir}` first")
        submit([job], profile, ctx, element_argv)
        print(f"submitted {len(pending)} elements as one array; results join {run_dir / 'results' / 'fewshot.csv'}")
        return 0
    from launcher.executors.local import LocalExecutor

    executor = LocalExecutor(out_dir, cfg.max_parallel, progress=not args.no_progress,
                             command_for=lambda job, unit: [sys.executable, "-m", "launcher",
                                                            *element_argv(job, unit)])
    result = executor.run([job])
    if result.failed:
        names = [u.unit for u in result.failed]
        print(f"btm: {len(names)} element(s) did not finish: {', '.join(names)}; logs in "
              f"{out_dir / 'jobs' / 'logs'}; run again to retry only those", file=sys.stderr)
        return 1
    print(f"{len(pending)} element(s) done; results in {run_dir / 'results' / 'fewshot.csv'}")
    return 0


def cmd_element(args) -> int:
    from launcher.stages.fewshot import run_element

    return run_element(args.manifest, args.index)
