"""The eval stage's body: every configured method and baseline into ``results/``.

Called by ``launcher.stages.eval_run`` (the stage checks and records it). The scores were
cached by the score array (same cache key), so this is mostly mixing: ensembles and single
experts through ``fairseq_ext.evaluate.evaluate_forest``, parameter averages through
``average_forest`` + ``evaluate_model``, the dense baseline through ``evaluate_model``, and the
random-split baseline as the uniform ensemble of its experts (method ``random_split``).
"""
from __future__ import annotations

import os
from pathlib import Path

from launcher.errors import BtmError
from launcher.forest import Forest

FOREST_METHODS = {"experts": "expert", "ensemble_uniform": "ensemble_uniform", "ensemble_prior": "ensemble_prior",
                  "ensemble_posterior": "ensemble_posterior", "ensemble_prev_token": "ensemble_prev_token",
                  "topk_prior": "topk_prior"}


def evaluate_run(ctx, device: str) -> None:
    try:
        from fairseq_ext.evaluate import EvalSettings, average_forest, evaluate_forest, evaluate_model
    except ImportError as e:
        raise BtmError(f"the eval stage needs fairseq_ext.evaluate, which is not available: {e}") from None
    from launcher.results import append_results

    p, cfg, run_dir = ctx.params, ctx.config, ctx.run_dir
    forest = Forest.load(run_dir)
    experts = {e.name: forest.checkpoint_path(e) for e in forest.experts}
    if not experts:
        raise BtmError(f"{forest.path} lists no experts")
    domains = list(p["domains"])
    methods = list(p["methods"])
    forest_methods = tuple(FOREST_METHODS[m] for m in methods if m in FOREST_METHODS)
    settings = EvalSettings(methods=forest_methods or ("expert",), top_k=(p["top_k"],), split=p["split"],
                            device=device)
    n = len(experts)
    if forest_methods:
        evaluate_forest(run_dir, experts, domains, data_dir=ctx.data_dir, settings=settings, run_name=cfg.name)
    for method in ("average_uniform", "average_argmax", "average_posterior"):
        if method not in methods:
            continue
        kind = method.split("_", 1)[1]
        targets = [None] if kind == "uniform" else domains
        for target in targets:
            avg = average_forest(run_dir, experts, kind, target, data_dir=ctx.data_dir, settings=settings)
            evaluate_model(run_dir, method, avg["checkpoint"], [target] if target else domains,
                           data_dir=ctx.data_dir, settings=settings, k=n, prior=avg["prior"], run_name=cfg.name)
    if "dense" in p["baselines"]:
        evaluate_model(run_dir, "dense", ctx.model_dir("dense") / "checkpoint_last.pt", domains,
                       data_dir=ctx.data_dir, settings=settings, k=1, run_name=cfg.name)
    if "random_split" in p["baselines"]:
        rand = {f"random{i}": ctx.model_dir(f"random{i}") / "checkpoint_last.pt" for i in range(len(cfg.expert_names))}
        # evaluate_forest writes its rows into the directory it is given; give it a scratch run
        # directory sharing our score cache, then file its rows under method random_split.
        scratch = run_dir / "baselines" / "random_split"
        scratch.mkdir(parents=True, exist_ok=True)
        if not (scratch / "scores").exists():
            os.symlink(Path("..") / ".." / "scores", scratch / "scores", target_is_directory=True)
        rows = evaluate_forest(scratch, rand, domains, data_dir=ctx.data_dir,
                               settings=EvalSettings(methods=("ensemble_uniform",), split=p["split"], device=device),
                               run_name=cfg.name)
        rows = rows.assign(method="random_split")
        append_results(run_dir, rows)
    if "cbtm_cluster" in methods:
        try:
            from fairseq_ext.evaluate import evaluate_cbtm
        except ImportError:
            raise BtmError("evaluation method cbtm_cluster needs fairseq_ext.evaluate.evaluate_cbtm, "
                           "which this checkout does not have yet") from None
        evaluate_cbtm(run_dir, experts, domains, clusters_dir=run_dir / "clusters", data_dir=ctx.data_dir,
                      settings=settings, run_name=cfg.name)
