"""c-BTM evaluation: the cluster experts mixed per token with weights routed from the context.

The routing of token t uses only the document's text before it (tf-idf -> SVD -> distance to
the cluster centres, ``fairseq_ext.cluster.routing``), top-k renormalised. The experts' scores
come from the same cache as every other method (``fairseq_ext.evaluate.Scorer``), so after the
score stage this is only routing and mixing. Returns results rows, method ``cbtm_cluster``;
the caller files them.
"""
from __future__ import annotations

import time
from pathlib import Path

from launcher.contract import methods as registry
from launcher.contract.errors import BtmError
from launcher.contract.names import validate_name
from fairseq_ext import ensemble
from fairseq_ext.evaluate import EvalDirs, EvalSettings, Scorer, result_row
from fairseq_ext.priors import stack_scores

METHOD = registry.of_kind("cluster", registry.REGISTRY)[0]  # the results' method name


def evaluate_clusters(experts: dict[str, Path], cluster_model_dir: str | Path, eval_domains: list[str],
                      dirs: EvalDirs, *, settings: EvalSettings = EvalSettings(), run_name: str,
                      temperature: float = 0.1, stride: int = 32) -> list[dict]:
    """One ``cbtm_cluster`` row per eval domain and k of ``settings.top_k`` (k capped at the
    number of clusters): the experts ``cluster_<i>`` of the fitted model at ``cluster_model_dir``
    mixed with token-level routing weights (``stride`` tokens per routing block)."""
    from fairseq_ext.cluster.assign import cluster_name
    from fairseq_ext.cluster.model_io import load_model as load_cluster_model
    from fairseq_ext.cluster.routing import token_route_weights_from_ids
    from fairseq_ext.data_prep import decode_ids

    settings = settings.validate()
    model = load_cluster_model(cluster_model_dir)
    names = [cluster_name(i) for i in range(model.k)]  # the experts, in cluster order
    missing = [n for n in names if n not in experts]
    if missing:
        raise BtmError(f"{METHOD} needs every cluster's expert (the model at {cluster_model_dir} has "
                       f"k={model.k}); missing from the forest: {', '.join(missing)}")
    scorer = Scorer(dirs, settings)
    rows = []
    for domain in eval_domains:
        validate_name(domain, "eval domain")
        scores = [scorer(experts[n], domain, settings.split) for n in names]
        lp, starts = stack_scores(scores)
        for k in sorted(set(min(k, model.k) for k in settings.top_k)):
            t0 = time.perf_counter()
            weights = token_route_weights_from_ids(model, scores[0].targets, starts,
                                                   lambda ids: decode_ids(dirs.data, ids), stride=stride,
                                                   temperature=temperature, top_k=k)
            out = ensemble.mix_with_weights(lp, weights)
            row = result_row(run_name, METHOD, k, f"route(T={temperature},stride={stride})", domain,
                             settings.split, out, scores, time.perf_counter() - t0)
            rows.append({**row, "n_clusters": model.k,
                         "routing": f"tfidf-svd top{k} T={temperature} stride={stride}"})
    return rows
