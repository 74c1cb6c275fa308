"""btm verbs: forest list|add|remove|verify (the forest manifest, forest.json) and ablate
(expert removal from cached scores)."""
from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser("forest", help="list, add, remove, verify or ablate the experts of a forest",
                              description="Inspect and edit a forest manifest (RUN_DIR/forest.json), "
                                          "or measure what removing each expert costs.")
    sub = p.add_subparsers(dest="forest_command", metavar="ACTION")
    sub.required = True

    ls = sub.add_parser("list", help="one line per expert", description="List the experts of a forest.")
    ls.add_argument("forest", help="run directory or forest.json")
    ls.set_defaults(func=cmd_list)

    add = sub.add_parser("add", help="add a trained expert checkpoint",
                         description="Add an expert (its checkpoint is hashed) without touching the others.")
    add.add_argument("forest", help="run directory or forest.json")
    add.add_argument("name", help="expert name")
    add.add_argument("checkpoint", help="checkpoint file, relative to the current directory (a path inside "
                     "the run directory is stored relative to it)")
    add.add_argument("--domains", required=True, help="comma-separated training domains")
    add.add_argument("--parent", action="append", default=[], metavar="NAME=WEIGHT",
                     help="a parent and its branch weight (repeatable)")
    add.add_argument("--updates", type=int, default=0, help="updates trained")
    add.add_argument("--tokens", type=int, default=0, help="tokens trained")
    add.set_defaults(func=cmd_add)

    rm = sub.add_parser("remove", help="remove an expert (its files stay)",
                        description="Remove an expert from the manifest; its checkpoint is not deleted.")
    rm.add_argument("forest", help="run directory or forest.json")
    rm.add_argument("name", help="expert name")
    rm.set_defaults(func=cmd_remove)

    vf = sub.add_parser("verify", help="re-hash every checkpoint and name those that changed",
                        description="Re-hash every checkpoint; exit 1 naming experts whose checkpoint changed or vanished.")
    vf.add_argument("forest", help="run directory or forest.json")
    vf.set_defaults(func=cmd_verify)

    ab = sub.add_parser(
        "ablate", help="expert removal: the perplexity cost of dropping each expert, per domain",
        description="For every expert of the run's forest: remove it, re-estimate each eval domain's "
                    "prior over the remaining experts, re-mix their cached scores, and report the "
                    "relative perplexity change on every eval domain (BTM's data opt-out). Uses only "
                    "cached scores (no training, no scoring): run `btm run` first. Writes "
                    "RUN_DIR/results/ablation.csv and a heatmap, ablation.png, beside it.")
    ab.add_argument("run_dir", help="a run directory made by `btm run` (its config.yaml, forest.json, scores)")
    ab.add_argument("--method", default="ensemble_posterior",
                    help="the ensemble the forest is mixed with: ensemble_posterior (default), "
                         "ensemble_prior, ensemble_prev_token or ensemble_uniform")
    ab.add_argument("--domains", help="comma-separated eval domains (default: the config's domains.eval)")
    ab.set_defaults(func=cmd_ablate)


def _parse_parents(items: list[str]) -> dict[str, float]:
    from launcher.contract.errors import BtmError, shown
    from launcher.contract.names import validate_name

    out = {}
    for item in items:
        name, sep, weight = item.partition("=")
        try:
            out[validate_name(name, "parent name")] = float(weight) if sep else 1.0
        except ValueError:
            raise BtmError(f"--parent {shown(item)}: weight {shown(weight)} is not a number") from None
    return out


def cmd_list(args) -> int:
    from launcher.contract.forest import Forest
    from launcher.status import format_table

    forest = Forest.load(args.forest)
    rows = [(e.id, e.name, ",".join(e.domains),
             ",".join(f"{k}:{v:.3g}" for k, v in e.parents.items()) or "-", e.updates, e.tokens,
             e.sha256[:12], e.checkpoint) for e in forest.experts]
    print(format_table(("id", "name", "domains", "parents", "updates", "tokens", "sha256", "checkpoint"), rows), end="")
    if forest.missing:
        print(f"missing (did not finish): {', '.join(forest.missing)}")
    return 0


def cmd_add(args) -> int:
    import os

    from launcher.contract.forest import editing

    # A path typed on the command line is relative to where it was typed, not to the forest.
    checkpoint = os.path.abspath(args.checkpoint)
    with editing(args.forest) as forest:
        e = forest.add(args.name, [d for d in args.domains.split(",") if d], checkpoint,
                       parents=_parse_parents(args.parent), updates=args.updates, tokens=args.tokens)
    print(f"added expert {e.name} (id {e.id}, sha256 {e.sha256[:12]})")
    return 0


def cmd_remove(args) -> int:
    from launcher.contract.forest import editing

    with editing(args.forest) as forest:
        e = forest.remove(args.name)
    print(f"removed expert {e.name} (its checkpoint {e.checkpoint} is kept)")
    return 0


def cmd_verify(args) -> int:
    import sys

    from launcher.contract.forest import Forest

    forest = Forest.load(args.forest)
    bad = forest.verify()
    if bad:
        print(f"changed or missing checkpoints: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"all {len(forest.experts)} checkpoints match forest.json")
    return 0


def cmd_ablate(args) -> int:
    from analysis.heatmaps import plot_ablation_heatmap
    from analysis.plots import PlotSkipped, save_png
    from launcher.contract.forest import verified_checkpoints
    from launcher.contract.layout import RunLayout
    from launcher.stages.eval import EvalParams, eval_settings, eval_units
    from launcher.stages.evaluation import evaluate_ablation
    from launcher.stages.runner import load_run_config
    from launcher.status import format_table

    layout = RunLayout(args.run_dir)
    cfg = load_run_config(args.run_dir)
    params = EvalParams(**eval_units(cfg)[0].params)
    domains = [d for d in args.domains.split(",") if d] if args.domains else list(params.domains)
    table = evaluate_ablation(layout, verified_checkpoints(layout.forest), domains, eval_settings(params),
                              method=args.method)
    shown = table.pivot_table(index="removed", columns="eval_domain", values="rel_ppl_change", sort=False)
    rows = [(name, *(f"{100 * shown.at[name, d]:+.2f}%" for d in shown.columns)) for name in shown.index]
    print(f"relative perplexity change without each expert ({table['method'].iloc[0]}, "
          f"split {table['split'].iloc[0]}):")
    print(format_table(("removed", *shown.columns), rows), end="")
    print(f"table: {layout.ablation}")
    try:
        png = save_png(plot_ablation_heatmap(table, title=layout.root.resolve().name),
                       layout.ablation.with_suffix(".png"))
        print(f"heatmap: {png}")
    except PlotSkipped as e:
        print(f"heatmap skipped: {e}")
    return 0
