"""btm verb: moe (the forest of a run turned into one Mixture-of-Experts model and trained).

    btm moe RUN_DIR [--dry-run] [--force] [--nproc-per-node N]

It runs the unit of the run's ``moe`` stage (launcher/stages/moe.py), exactly what the pipeline's
moe job runs: the settings come from the run's config section ``moe:`` (which must be enabled,
since the MoE's updates are taken from the experts' share of the budget), the record is written
the same way, and on SIGUSR2/SIGTERM it saves and exits 3 to be requeued.
"""
from __future__ import annotations

import json

from launcher.contract.errors import BtmError


def _moe(args) -> int:
    from launcher.stages import find_unit, load_run_config, run_stage
    from launcher.stages.moe import STAGE

    cfg = load_run_config(args.run_dir)
    if not cfg.moe.enabled:
        raise BtmError(f"{args.run_dir}/config.yaml: moe.enabled is false; set `moe: {{enabled: true}}` "
                       "in the run's config (its updates come from the experts' budget, so the "
                       "experts must be planned with it) and run `btm run` again")
    if args.dry_run:
        unit = find_unit(cfg, "moe", None)
        budget = STAGE.budget(cfg)
        print(json.dumps({"stage": "moe", "params": unit.params, "gpus": STAGE.gpus(cfg),
                          "budget": {"updates": budget.updates, "gpus": budget.gpus,
                                     "tokens": budget.tokens}}, indent=2))
        return 0
    return run_stage(args.run_dir, "moe", None, force=args.force, nproc=args.nproc_per_node)


def register(subparsers):
    p = subparsers.add_parser(
        "moe", help="turn a run's forest into one Mixture-of-Experts model and train it",
        description="Branch-Train-MiX: build one MoE model from the run's forest (each layer's "
                    "FFNs become that layer's experts, embeddings/attention/norms are averaged, "
                    "a top-k router is added) into RUN_DIR/moe/init.pt, then train it on the "
                    "balanced mix of the training domains for moe.budget_share of the budget "
                    "(config section `moe:`). Same code as the pipeline's moe stage; resumes "
                    "from RUN_DIR/moe/checkpoint_last.pt.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory whose merge stage is done")
    p.add_argument("--dry-run", action="store_true",
                   help="print the unit's settings and compute budget, run nothing")
    p.add_argument("--force", action="store_true", help="run even if the stage's record is current")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="train on N processes of this node, one per GPU (torchrun)")
    p.set_defaults(func=_moe)
