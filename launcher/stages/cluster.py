"""The cluster stage (c-BTM): cluster the training domains' documents; each cluster becomes a
domain of the run's data (``cluster_<i>``), binarized with the run's tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.stages.base import Ctx, Params, Stage, need, units_of
from launcher.stages.data import corpus_files, data_outputs, link_domain, prepare_more


@dataclass(frozen=True)
class ClusterParams(Params):
    k: int
    domains: list[str]
    seed: int
    corpus: str
    text_field: str


def cluster_units(cfg: Config):
    return units_of([(None, ClusterParams(cfg.clusters.k, list(cfg.domains.train), cfg.seed, cfg.corpus.path,
                                          cfg.corpus.text_field))])


def cluster_inputs(ctx: Ctx) -> list[Path]:
    return [*corpus_files(Path(ctx.params.corpus), ctx.params.domains), ctx.data_dir / "dict.txt"]


def cluster_run(ctx: Ctx):
    build = need("fairseq_ext.cluster", "build_cluster_domains")
    p = ctx.params
    out = build(str(ctx.layout.corpus), str(ctx.layout.clusters), p.k, seed=p.seed,
                domains=list(p.domains), text_field=p.text_field)
    for name in out["domains"]:
        link_domain(ctx, name, Path(out["corpus_dir"]) / name)
    prepare_more(ctx, out["domains"])
    # The fitted model is an output too: the eval stage routes documents with it (c-BTM).
    fitted = sorted(q for q in ctx.layout.cluster_model.glob("*") if q.is_file())
    return [*data_outputs(ctx, out["domains"]), *fitted], {"clusters": out["domains"], "cluster_report": out.get("report")}


STAGE = Stage("cluster", ClusterParams, cluster_units, cluster_inputs, cluster_run,
              after_ok=lambda cfg: ["data"], enabled=lambda cfg: cfg.method == "cbtm")
