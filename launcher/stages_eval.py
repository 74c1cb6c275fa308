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

from launcher.contract.errors import BtmError
from launcher.contract.forest import Forest

FOREST_METHODS = {"experts": "expert", "ensemble_uniform": "ensemble_uniform", "ensemble_prior": "ensemble_prior",
                  "ensemble_posterior": "ensemble_posterior", "ensemble_prev_token": "ensemble_prev_token",
                  "topk_prior": "topk_prior"}


def evaluate_run(ctx, device: str) -> None:
    try:
        from fairseq_ext.evaluate import EvalSettings, average_forest, evaluate_forest, evaluate_model
    except ImportError as e:
        raise BtmError(f"the eval stage needs fairseq_ext.evaluate, which is not available: {e}") from None
    from launcher.contract.results import append_results

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
            # k = experts actually averaged (argmax averages one), as `btm average` reports it.
            k = sum(1 for w in avg["weights"] if w > 0)
            evaluate_model(run_dir, method, avg["checkpoint"], [target] if target else domains,
                           data_dir=ctx.data_dir, settings=settings, k=k, prior=avg["prior"], run_name=cfg.name)
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
        cbtm_rows(ctx, experts, domains, p["split"], p["top_k"], device)


def cbtm_rows(ctx, experts: dict, domains: list[str], split: str, top_k: int, device: str,
              temperature: float = 0.1, stride: int = 32) -> None:
    """c-BTM: mix the cluster experts per token with weights routed from the context so far.

    The routing of token t uses only the document's text before it (tf-idf -> SVD -> distance
    to the cluster centres, ``fairseq_ext.cluster.routing``), top-k renormalised.
    """
    import time

    import numpy as np

    from fairseq_ext import mixing
    from fairseq_ext.cluster.model_io import load_model as load_cluster_model
    from fairseq_ext.cluster.routing import token_route_weights_from_ids
    from fairseq_ext.data_prep import decode_ids
    from fairseq_ext.priors import stack_scores
    from fairseq_ext.scoring import score_split
    from launcher.contract.results import append_results

    model = load_cluster_model(ctx.run_dir / "clusters" / "model")
    names = [f"cluster_{i}" for i in range(model.k)]
    missing = [n for n in names if n not in experts]
    if missing:
        raise BtmError(f"cbtm_cluster needs every cluster's expert; missing from forest.json: {', '.join(missing)}")
    k = min(top_k, model.k)
    rows = []
    for domain in domains:
        t0 = time.perf_counter()
        scores = [score_split(experts[n], ctx.data_dir, domain, split, cache_dir=ctx.run_dir / "scores",
                              device=device) for n in names]
        lp, starts = stack_scores(scores)
        weights = token_route_weights_from_ids(model, scores[0].targets, starts,
                                               lambda ids: decode_ids(ctx.data_dir, ids), stride=stride,
                                               temperature=temperature, top_k=k)
        out = mixing.mix_with_weights(lp, weights)
        nll = float(-np.mean(out))
        rows.append({"run": ctx.config.name, "method": "cbtm_cluster", "k": k,
                     "prior": f"route(T={temperature},stride={stride})", "eval_domain": domain, "split": split,
                     "tokens": int(out.shape[0]), "nll": nll, "ppl": float(np.exp(nll)),
                     "expert_forward_passes": int(sum(s.forward_passes for s in scores)),
                     "seconds": time.perf_counter() - t0, "n_clusters": model.k,
                     "routing": f"tfidf-svd top{k} T={temperature} stride={stride}"})
    append_results(ctx.run_dir, rows)
