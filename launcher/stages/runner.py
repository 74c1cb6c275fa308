"""``btm stage RUN_DIR STAGE --unit NAME``: run one unit of one stage, then record it.

The same entry point runs locally, in an sbatch (array) task and by hand. It loads the run's
resolved ``config.yaml``, finds the unit's parameters (the stage's ``units``), returns at once
if the unit's record is current, otherwise does the work (the stage's ``run``) and writes the
record atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

from launcher.config import Config, load_config
from launcher.contract.errors import PREEMPTED_EXIT, BtmError
from launcher.contract.layout import RunLayout
from launcher.lock import unit_lock
from launcher.records import HashCache, hash_files, now, read_record, record_is_current, write_record
from launcher.stages import find_unit, get_stage
from launcher.stages.base import Ctx
from launcher.threads import apply_slurm_threads
from launcher.stages.training import Preempted


def load_run_config(run_dir: str | Path) -> Config:
    path = RunLayout(run_dir).config
    if not path.is_file():
        raise BtmError(f"{run_dir} is not a btm run directory (no config.yaml); start it with `btm run`")
    return load_config(path)


def run_stage(run_dir: str | Path, stage: str, unit_name: str | None, force: bool = False,
              nproc: int = 1, nodes: int = 1) -> int:
    """Run one unit; 0 = done (now or before), PREEMPTED_EXIT = saved, requeue me.

    ``nproc`` > 1: a training stage trains on that many processes of this node (torchrun);
    ``nodes`` > 1: on ``nproc`` processes of each of that many nodes of the job (srun).
    """
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    impl = get_stage(stage)
    unit = find_unit(cfg, stage, unit_name)
    if nproc < 1:
        raise BtmError(f"--nproc-per-node must be >= 1, got {nproc}")
    if nodes < 1:
        raise BtmError(f"--nodes must be >= 1, got {nodes}")
    # Before the stage imports torch: its thread pool is sized when torch starts.
    for var, value in apply_slurm_threads(nproc).items():
        print(f"{var}={value} (from SLURM_CPUS_PER_TASK={os.environ['SLURM_CPUS_PER_TASK']}, "
              f"{nproc} process(es))", flush=True)
    ctx = Ctx(run_dir, cfg, unit, impl, nproc, nodes)
    with unit_lock(run_dir, stage, unit_name):
        return _run_unit(ctx, force)


def _run_unit(ctx: Ctx, force: bool) -> int:
    """The body of ``run_stage``, under the unit's lock."""
    run_dir, cfg, unit, impl = ctx.run_dir, ctx.config, ctx.unit, ctx.stage
    stage, unit_name = impl.name, unit.name
    cache = HashCache(run_dir)
    label = f"{stage}" + (f" {unit_name}" if unit_name else "")
    if not force and record_is_current(read_record(run_dir, stage, unit_name), unit.params, cache):
        print(f"{label}: already done (record is current)")
        return 0
    missing = [p for p in impl.inputs(ctx) if not p.exists()]
    if missing:
        raise BtmError(f"{label}: missing input(s) {', '.join(map(str, missing[:5]))} (has the upstream stage run?)")
    inputs = hash_files(cache, impl.inputs(ctx))
    started = now()
    print(f"{label}: started {started}", flush=True)
    try:
        outputs, extra = impl.run(ctx)
    except Preempted:
        print(f"{label}: saved its state; exiting {PREEMPTED_EXIT} to be requeued", flush=True)
        return PREEMPTED_EXIT
    write_record(run_dir, stage, unit_name, params=unit.params, config_hash=cfg.config_hash(),
                 inputs=inputs, outputs=hash_files(cache, outputs), started=started, extra=extra,
                 config=cfg.to_dict(), kept=[cache.rel(q) for q in impl.kept(ctx)])
    cache.save()
    print(f"{label}: done", flush=True)
    return 0
