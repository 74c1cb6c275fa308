"""Evaluation on the launcher's side (shared by the eval stage and `btm eval`/`btm average`, as
training.py is by the training stages and `btm seed`/`btm train`): which models, which paths, and filing the rows.

Model code (``fairseq_ext.evaluate``, ``fairseq_ext.evaluate_cbtm``) takes plain directories
and returns results rows; the functions here resolve those directories with ``RunLayout``, the
forest with ``launcher.contract.forest`` and append the rows with
``launcher.contract.results``. ``btm eval`` / ``btm average`` (launcher/commands/eval.py) and
the eval stage (launcher/stages/eval.py) go through the same
functions, so every method the stage computes, c-BTM included, is one ``btm eval`` away.

The eval stage finds the scores cached by the score array (same cache key), so it is mostly
mixing: single experts, ensembles, top-k, the random-split baseline (the uniform ensemble of
its experts) and c-BTM by mixing, parameter averages and merges and the dense baseline as single
models.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from launcher.config import Config
from launcher.contract import methods as registry
from launcher.contract.errors import BtmError, shown
from launcher.contract.forest import verified_checkpoints
from launcher.contract.layout import DENSE, RunLayout, random_split_name
from launcher.contract.ablation import write_ablation
from launcher.contract.presets import get_preset
from launcher.contract.results import append_results


def _fairseq_ext(module: str):
    import importlib

    try:
        return importlib.import_module(f"fairseq_ext.{module}")
    except ImportError as e:
        raise BtmError(f"evaluation needs fairseq_ext.{module}, which is not available: {e}") from None


def prior_fields(cfg: Config) -> dict:
    """The cached prior's unit parameters from the config (eval; moe's posterior weights)."""
    ev = cfg.evaluation
    return dict(prior_estimator=ev.prior_estimator,
                prior_block_tokens=get_preset(cfg.model.preset).tokens_per_sample,
                prior_temperatures=list(ev.prior_temperatures))


def prior_settings(p):
    """``PriorSettings`` from a unit's ``prior_fields`` (an EvalParams or MoeParams)."""
    return _fairseq_ext("priors").PriorSettings(estimator=p.prior_estimator, block_tokens=p.prior_block_tokens,
                                                temperatures=tuple(p.prior_temperatures))


def eval_dirs(layout: RunLayout, data_dir: Path | None = None):
    """The plain directories model code evaluates with (``data_dir`` overrides RUN/data)."""
    return _fairseq_ext("evaluate").EvalDirs(data=data_dir or layout.data, scores=layout.scores,
                                             priors=layout.priors, averages=layout.averages)


def _file(layout: RunLayout, rows: list[dict]):
    """Append rows to the run's results table; the new rows as a DataFrame."""
    if not rows:
        raise BtmError("no evaluation rows to file (no method and no eval domain?)")
    return append_results(layout.root, rows).tail(len(rows)).reset_index(drop=True)


def run_name(layout: RunLayout, name: str | None) -> str:
    """The results' ``run`` column: ``name`` if given, else the run directory's name."""
    return name or layout.root.resolve().name


def evaluate_mixes(layout: RunLayout, experts: dict[str, Path], domains: list[str], settings, *,
                   name: str | None = None, data_dir: Path | None = None):
    """The mixing methods of ``settings.methods`` (registered names: experts, ensembles, top-k,
    random_split, c-BTM) on ``domains``, appended to the results; returns the new rows."""
    evaluate = _fairseq_ext("evaluate")
    dirs, run = eval_dirs(layout, data_dir), run_name(layout, name)
    wanted = [registry.canonical(m) for m in settings.methods]
    clusters = registry.of_kind("cluster", wanted)
    mixes = tuple(m for m in wanted if m not in clusters)
    rows = []
    if mixes:
        rows += evaluate.evaluate_forest(experts, domains, dirs, settings=dataclasses.replace(settings, methods=mixes),
                                         run_name=run)
    if clusters:
        rows += _fairseq_ext("evaluate_cbtm").evaluate_clusters(
            experts, layout.cluster_model, domains, dirs, settings=dataclasses.replace(settings, methods=()),
            run_name=run)
    return _file(layout, rows)


def evaluate_model(layout: RunLayout, method: str, checkpoint: Path, domains: list[str], settings, *,
                   k: int = 1, prior: str = "none", name: str | None = None, data_dir: Path | None = None):
    """One model's rows (dense, a parameter average, ...) appended to the results; returns them."""
    rows = _fairseq_ext("evaluate").evaluate_model(method, checkpoint, domains, eval_dirs(layout, data_dir),
                                                   settings=settings, k=k, prior=prior,
                                                   run_name=run_name(layout, name))
    return _file(layout, rows)


def evaluate_average(layout: RunLayout, experts: dict[str, Path], rule: str, target: str | None,
                     domains: list[str], settings, *, merge=None, average_name: str | None = None,
                     name: str | None = None, data_dir: Path | None = None):
    """Build (or reuse) the parameter merge of the experts with ``rule`` weights (uniform,
    argmax, posterior) in RUN/averages/ and file its rows under its registered name:
    ``average_<rule>`` for the linear average, ``merge_<method>_<rule>`` for a
    ``fairseq_ext.evaluate.MergeSpec`` ``merge``. Returns (average.json's record, the new rows)."""
    evaluate = _fairseq_ext("evaluate")
    merge = merge or evaluate.MergeSpec()
    method = registry.merge_method_name(merge.method, rule)
    record = evaluate.average_forest(experts, rule, target, eval_dirs(layout, data_dir), settings=settings,
                                     name=average_name, merge=merge)
    if not domains:
        raise BtmError(f"--eval-domains is required with --method {rule if merge.method == 'linear' else merge.method} "
                       "and no --target-domain")
    # k = experts actually merged (argmax merges one).
    k = sum(1 for w in record["weights"] if w > 0)
    rows = evaluate_model(layout, method, Path(record["checkpoint"]), domains, settings, k=k,
                          prior=record["prior"], name=name, data_dir=data_dir)
    return record, rows


def evaluate_merges(layout: RunLayout, experts: dict[str, Path], methods: list[str], domains: list[str],
                    settings, *, name: str | None = None, data_dir: Path | None = None) -> list:
    """The parameter averages and merges among ``methods`` (registered ``average_*`` and
    ``merge_*`` names, default parameters): a uniform one is one model scored on every domain,
    the others one model per domain, weighted by that domain's prior. Returns the new rows."""
    evaluate = _fairseq_ext("evaluate")
    rows = []
    for method in registry.of_kind("average", methods) + registry.of_kind("merge", methods):
        merge_method, rule = registry.merge_parts(method)
        for target in ([None] if rule == "uniform" else domains):
            rows.append(evaluate_average(layout, experts, rule, target, [target] if target else domains,
                                         settings, merge=evaluate.MergeSpec(method=merge_method),
                                         name=name, data_dir=data_dir)[1])
    return rows


def evaluate_ablation(layout: RunLayout, experts: dict[str, Path], domains: list[str], settings, *,
                      method: str = "ensemble_posterior"):
    """Expert removal (fairseq_ext/ablation.py) from the cached scores into ``layout.ablation``
    (replaced whole: it describes the forest as it is now); returns the table."""
    rows = _fairseq_ext("ablation").ablate_experts(experts, domains, eval_dirs(layout), settings=settings,
                                                   method=method)
    return write_ablation(layout.ablation, rows)


def evaluate_moe(layout: RunLayout, checkpoint: Path, forest: dict[str, Path], domains: list[str],
                 settings, *, experts: list[str] | None = None, name: str | None = None,
                 data_dir: Path | None = None):
    """The MoE model's rows (method ``moe``, k = its top_k) appended to the results, its
    routing statistics (which expert slots each domain's tokens go to, per layer) to the
    routing table, and its inference speed against one expert and the full ensemble (the
    ``forest`` checkpoints, already verified by the caller, of ``experts``) to the inference
    table. ``experts``: the slots' expert names (None: from the moe stage's record). Returns
    the new results rows."""
    from launcher.contract.moe_tables import INFERENCE, ROUTING

    if experts is None:
        from launcher.records import read_record

        built = (read_record(layout.root, "moe", None) or {}).get("moe")
        if not built:
            raise BtmError(f"{layout.record('moe', None)} is missing or names no experts: run the "
                           "moe stage (`btm moe RUN_DIR`) before evaluating its MoE")
        experts = [e["name"] for e in built["experts"]]
    missing = [e for e in experts if e not in forest]
    if missing:
        raise BtmError(f"{layout.forest} has no expert {', '.join(map(shown, missing))}, which the "
                       f"MoE {checkpoint} was built from: its speed is measured against them")

    device = _fairseq_ext("evaluate").resolve_device(settings.device)
    run, data = run_name(layout, name), data_dir or layout.data
    top_k = _fairseq_ext("moe.build").moe_top_k(checkpoint)
    new = evaluate_model(layout, "moe", checkpoint, domains, settings, k=top_k, name=name,
                         data_dir=data_dir)
    routing = _fairseq_ext("moe.routing").routing_statistics(
        checkpoint, data, domains, settings.split, expert_names=experts, run=run, device=device,
        trust_pickle=settings.trust_checkpoint)
    append_results(layout.root, routing, ROUTING)
    speed = _fairseq_ext("moe.speed").moe_inference_speed(
        checkpoint, {e: forest[e] for e in experts}, data, domains, settings.split, run=run,
        device=device, trust_pickle=settings.trust_checkpoint)
    append_results(layout.root, speed, INFERENCE)
    return new
