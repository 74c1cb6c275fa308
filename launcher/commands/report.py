"""btm verb: report (tables and plots of one or several runs; analysis/report.py)."""
from __future__ import annotations


def _report(args) -> int:
    from analysis.report import build_report  # pandas/matplotlib only when asked for
    from launcher.contract.atomic import check_output_dir

    if args.out is not None:
        check_output_dir(args.out, "--out")
    path = build_report(args.run_dirs, out=args.out, split=args.split)
    print(f"wrote {path}")
    return 0


def register(subparsers):
    p = subparsers.add_parser(
        "report", help="write report.md with perplexity tables, compute hours and plots",
        description="Write a Markdown report (with LaTeX/CSV tables and PNG plots) from the "
                    "results table, job records and cached priors of one or several runs. With "
                    "several runs the tables and plots compare them side by side.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to report on")
    p.add_argument("--out", default=None,
                   help="output directory (default: RUN_DIR/report of the first run)")
    p.add_argument("--split", default=None,
                   help="split to tabulate (default: test if present, else valid, else the "
                        "most common split)")
    p.set_defaults(func=_report)
