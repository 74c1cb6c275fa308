"""The cluster stages (c-BTM): cluster the training domains' documents; each cluster becomes a
domain of the run's data (``cluster_<i>``), binarized with the run's tokenizer.

- ``cluster_fit`` (one job): tf-idf + balanced k-means on a bounded sample of the train split;
- ``cluster_assign`` (array of ``clusters.assign_tasks``): each task assigns one contiguous
  slice of the corpus's documents (fairseq_ext.cluster.assign);
- ``cluster`` (one job): merge the slices into the cluster domains, then binarize them.

Every step skips work whose outputs exist for the same model, corpus and settings."""
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
    assign_tasks: int


def cluster_units(cfg: Config):
    return units_of([(None, ClusterParams(cfg.clusters.k, list(cfg.domains.train), cfg.seed, cfg.corpus.path,
                                          cfg.corpus.text_field, cfg.clusters.assign_tasks))])


def cluster_inputs(ctx: Ctx) -> list[Path]:
    return [*corpus_files(Path(ctx.params.corpus), ctx.params.domains), ctx.data_dir / "dict.txt"]


def _assign_settings(p: ClusterParams):
    settings = need("fairseq_ext.cluster", "AssignSettings")
    return settings(domains=list(p.domains), text_field=p.text_field)


def fit_run(ctx: Ctx):
    """Fit, then count the documents once for the assign array (each task reads its slice only)."""
    fit_model_dir = need("fairseq_ext.cluster.pipeline", "fit_model_dir")
    fit_settings = need("fairseq_ext.cluster", "FitSettings")
    count_corpus = need("fairseq_ext.cluster.assign", "count_corpus")
    p = ctx.params
    fitted = fit_model_dir(str(ctx.layout.corpus), ctx.layout.cluster_model,
                           fit_settings(k=p.k, seed=p.seed, domains=list(p.domains), text_field=p.text_field))
    count_corpus(str(ctx.layout.corpus), ctx.layout.clusters / "domains", _assign_settings(p))
    return [ctx.layout.cluster_model / "model.json", ctx.layout.cluster_model / "model.npz"], {"fitted": fitted}


FIT_STAGE = Stage("cluster_fit", ClusterParams, cluster_units, cluster_inputs, fit_run,
                  after_ok=lambda cfg: ["data"], enabled=lambda cfg: cfg.method == "cbtm")


@dataclass(frozen=True)
class AssignTaskParams(ClusterParams):
    task: int  # the slice of the corpus, of assign_tasks


def assign_units(cfg: Config):
    (whole,) = cluster_units(cfg)
    return units_of([(f"s{t}", AssignTaskParams(**whole.params, task=t)) for t in range(cfg.clusters.assign_tasks)])


def assign_inputs(ctx: Ctx) -> list[Path]:
    return [*corpus_files(Path(ctx.params.corpus), ctx.params.domains), ctx.layout.cluster_model / "model.json"]


def assign_run(ctx: Ctx):
    """Assign this task's slice; the merge removes the slices, so they are not outputs."""
    assign_shard = need("fairseq_ext.cluster", "assign_shard")
    p = ctx.params
    summary = assign_shard(ctx.layout.cluster_model, str(ctx.layout.corpus), ctx.layout.clusters / "domains",
                           p.task, p.assign_tasks, _assign_settings(p))
    return [], {"documents": summary.get("documents")}


ASSIGN_STAGE = Stage("cluster_assign", AssignTaskParams, assign_units, assign_inputs, assign_run,
                     after_ok=lambda cfg: ["cluster_fit"], array=True, enabled=lambda cfg: cfg.method == "cbtm")


def cluster_run(ctx: Ctx):
    merge_shards = need("fairseq_ext.cluster", "merge_shards")
    cluster_name = need("fairseq_ext.cluster.assign", "cluster_name")
    p = ctx.params
    out = ctx.layout.clusters / "domains"
    report = merge_shards(ctx.layout.cluster_model, str(ctx.layout.corpus), out, p.assign_tasks, _assign_settings(p))
    domains = [cluster_name(c) for c in range(p.k)]
    for name in domains:
        link_domain(ctx, name, out / name)
    prepare_more(ctx, domains)
    return data_outputs(ctx, domains), {"clusters": domains, "cluster_report": report}


STAGE = Stage("cluster", ClusterParams, cluster_units, cluster_inputs, cluster_run,
              after_ok=lambda cfg: ["cluster_assign"], enabled=lambda cfg: cfg.method == "cbtm")
