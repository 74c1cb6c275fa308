"""The merge stage: forest.json from every finished expert of the train stage. It runs after
*any* end of the train array and fails naming the experts that did not finish (after writing
the forest of those that did)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.contract.branch_record import branch_record_path
from launcher.contract.errors import BtmError
from launcher.contract.forest import editing
from launcher.records import HashCache, read_record, record_is_current
from launcher.stages.base import Ctx, Params, Stage, units_of
from launcher.stages.train import train_units
from launcher.stages.training import parents_by_name


@dataclass(frozen=True)
class MergeParams(Params):
    experts: list[str]


def merge_units(cfg: Config):
    return units_of([(None, MergeParams(list(cfg.expert_names)))])


def merge_inputs(ctx: Ctx) -> list[Path]:
    """The finished experts' checkpoints and the branch.json that names their parents."""
    return [p for n in ctx.params.experts
            for p in (ctx.layout.checkpoint(n), branch_record_path(ctx.model_dir(n))) if p.exists()]


def merge_run(ctx: Ctx):
    missing, cache = [], HashCache(ctx.run_dir)
    trained = {u.name: u for u in train_units(ctx.config)}
    with editing(ctx.layout.forest, ctx.config.name) as forest:
        for name in ctx.params.experts:
            unit = trained[name]
            rec = read_record(ctx.run_dir, "train", name)
            if not record_is_current(rec, unit.params, cache):
                missing.append(name)
                continue
            d = ctx.model_dir(name)
            # An expert branched from the seed has a branch.json naming its parents; one trained
            # from random init (no seed) has none.
            parents = parents_by_name(d) if unit.params["init"] else {}
            stats = rec.get("train", {})
            forest.add(name, unit.params["domains"], ctx.layout.checkpoint(name), parents=parents,
                       updates=stats.get("num_updates", 0), tokens=stats.get("tokens", 0),
                       metrics={"valid_losses": stats.get("valid_losses", {})},
                       sha256=rec["outputs"].get(cache.rel(ctx.layout.checkpoint(name))), replace=True)
        forest.missing = missing
        _readd_grown(ctx, forest, cache)
    cache.save()
    if missing:
        raise BtmError(f"forest.json written without {len(missing)} expert(s) that did not finish: "
                       f"{', '.join(missing)}; run `btm run` again to train only those")
    # forest.json is a kept output, not a hashed one: incremental experts and `btm forest` edit
    # it later without making the merge stale, but a deleted one makes `btm run` merge again.
    # The eval stage takes it as an input.
    return [], {"experts": list(ctx.params.experts)}


def _readd_grown(ctx: Ctx, forest, cache: HashCache) -> None:
    """The finished incremental experts (grow records), so that a forest.json rebuilt after it
    was deleted has them again; one not grown yet is added by its grow unit when it finishes."""
    from launcher.stages.grow import grow_units

    for unit in grow_units(ctx.config):
        rec = read_record(ctx.run_dir, "grow", unit.name)
        if record_is_current(rec, unit.params, cache) and unit.name not in forest.names():
            stats, checkpoint = rec.get("train", {}), ctx.layout.checkpoint(unit.name)
            forest.add(unit.name, unit.params["domains"], checkpoint, parents=rec.get("parents", {}),
                       updates=stats.get("num_updates", 0), tokens=stats.get("tokens", 0),
                       metrics={"valid_losses": stats.get("valid_losses", {})},
                       sha256=rec["outputs"].get(cache.rel(checkpoint)))


STAGE = Stage("merge", MergeParams, merge_units, merge_inputs, merge_run, after_any=lambda cfg: ["train"],
              kept=lambda ctx: [ctx.layout.forest])
