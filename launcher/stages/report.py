"""The report stage: ``RUN_DIR/report`` from the results table (analysis.report)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.stages.base import Ctx, Params, Stage, need, units_of


@dataclass(frozen=True)
class ReportParams(Params):
    run: str


def report_units(cfg: Config):
    return units_of([(None, ReportParams(cfg.name))])


def report_inputs(ctx: Ctx) -> list[Path]:
    return [ctx.layout.results / "results.csv"]


def report_run(ctx: Ctx):
    build_report = need("analysis.report", "build_report")
    return [Path(build_report([str(ctx.run_dir)]))], {}


STAGE = Stage("report", ReportParams, report_units, report_inputs, report_run, after_ok=lambda cfg: ["eval"])
