"""The data stages. Preparing the configured domains (and the random-split baseline's) is three
stages, fairseq_ext.data_prep's three steps (docs/data.md, "Sharding"):

- ``data_plan`` (one job): link the corpus into ``RUN_DIR/corpus``, train or reuse the
  tokenizer, cut the split files into shards of ``corpus.shard_mb`` (``DATA/shards.json``);
- ``data_shard`` (array of ``corpus.shard_tasks`` tasks): each binarizes its share of the
  shards (equal bytes per task);
- ``data`` (one job): merge the shards into each split's ``.bin``/``.idx`` and the manifest.

``data_incremental`` binarizes the incremental domains with the run's tokenizer, in one job."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.contract.atomic import atomic_write_text
from launcher.contract.corpus import FORMATS, SPLITS, find_split_file, iter_documents
from launcher.contract.data_manifest import prepared_domains, read_data_manifest
from launcher.contract.errors import BtmError
from launcher.contract.hf_model import hf_dir, hf_tokenizer_files
from launcher.contract.layout import random_split_name
from launcher.stages.base import Ctx, Params, Stage, need, units_of, workers


# ---- shared with the cluster stage ----------------------------------------------------------

def corpus_files(corpus: Path, domains) -> list[Path]:
    """The split files of each domain (the stage's inputs: an edited corpus file reruns it)."""
    out = []
    for d in domains:
        if not (corpus / d).is_dir():
            raise BtmError(f"corpus {corpus} has no domain directory {d!r}")
        out += sorted(p for s in SPLITS for ext in FORMATS if (p := corpus / d / f"{s}{ext}").is_file())
    return out


def link_domain(ctx: Ctx, name: str, target: Path) -> None:
    """``RUN_DIR/corpus/<name>`` -> ``target`` (a corpus domain directory)."""
    link = ctx.layout.corpus / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() != target.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(target.resolve(), target_is_directory=True)


def prepare_args(ctx: Ctx, domains: list[str]) -> dict:
    cfg = ctx.config
    return dict(domains=domains, train_domains=list(cfg.domains.train), vocab_size=cfg.corpus.vocab_size,
                text_field=cfg.corpus.text_field, seed=cfg.seed, progress=False,
                shard_bytes=int(cfg.corpus.shard_mb * (1 << 20)), tokenizer=cfg.corpus.tokenizer)


def prepare(ctx: Ctx, domains: list[str]) -> dict:
    """Binarize ``domains`` of ``RUN_DIR/corpus`` into ``RUN_DIR/data`` in this job (finished
    ones are skipped)."""
    prepare_data = need("fairseq_ext.data_prep", "prepare_data")
    return prepare_data(str(ctx.layout.corpus), str(ctx.data_dir), workers=workers(), **prepare_args(ctx, domains))


def prepare_more(ctx: Ctx, new: list[str]) -> None:
    """Binarize ``new`` domains beside the prepared ones, with the run's tokenizer."""
    have = prepared_domains(read_data_manifest(ctx.data_dir))
    prepare(ctx, [*have, *[d for d in new if d not in have]])


def tokenizer_file(ctx: Ctx) -> Path:
    """The run's tokenizer: btm's sentencepiece model, or the copy of corpus.tokenizer's."""
    return ctx.data_dir / ("tokenizer.json" if ctx.config.corpus.tokenizer else "spm.model")


def data_outputs(ctx: Ctx, domains) -> list[Path]:
    return [tokenizer_file(ctx), ctx.data_dir / "dict.txt",
            *ctx.layout.split_files(domains, SPLITS)]


# ---- data_plan, data_shard, data ---------------------------------------------------------------

@dataclass(frozen=True)
class DataParams(Params):
    corpus: str
    domains: list[str]  # training domains, then eval-only domains
    train_domains: list[str]
    vocab_size: int
    text_field: str
    random_split: int  # experts of the random-split baseline (0: none)
    seed: int  # the tokenizer's sample and the random split's shuffle
    tokenizer: str | None  # corpus.tokenizer (hf:PATH) or None: train sentencepiece
    shard_mb: float


def run_domains(cfg: Config) -> list[str]:
    """The domains the data stages prepare: training, eval-only, random-split baseline's."""
    base = [*cfg.domains.train, *[d for d in cfg.domains.eval if d not in cfg.domains.train]]
    return [*base, *([random_split_name(i) for i in range(len(cfg.expert_names))]
                     if "random_split" in cfg.baselines else [])]


def data_units(cfg: Config):
    base = [*cfg.domains.train, *[d for d in cfg.domains.eval if d not in cfg.domains.train]]
    # c-BTM: clusters are made from (and replace) the training domains; eval domains are kept.
    random_split = len(cfg.expert_names) if "random_split" in cfg.baselines else 0
    return units_of([(None, DataParams(cfg.corpus.path, base, list(cfg.domains.train), cfg.corpus.vocab_size,
                                       cfg.corpus.text_field, random_split, cfg.seed, cfg.corpus.tokenizer,
                                       cfg.corpus.shard_mb))])


def build_corpus_view(ctx: Ctx) -> Path:
    """``RUN_DIR/corpus``: the configured domains (symlinks) + the random-split baseline's domains.

    ``random<i>`` holds every n-th document of the pooled training domains after a seeded
    shuffle, per split: the paper's random-split forest sees the same data as the domain forest.
    """
    p = ctx.params
    corpus = Path(p.corpus)
    for d in p.domains:
        link_domain(ctx, d, corpus / d)
    n = p.random_split
    for split in SPLITS if n else ():
        docs = [doc for d in p.train_domains
                for doc in iter_documents(find_split_file(corpus, d, split), p.text_field)]
        random.Random(p.seed).shuffle(docs)
        for i in range(n):
            lines = "".join(json.dumps({p.text_field: t}) + "\n" for t in docs[i::n])
            atomic_write_text(ctx.layout.corpus / random_split_name(i) / f"{split}.jsonl", lines)
    return ctx.layout.corpus


def data_inputs(ctx: Ctx) -> list[Path]:
    source = hf_dir(ctx.params.tokenizer)
    return [*corpus_files(Path(ctx.params.corpus), ctx.params.domains),
            *(hf_tokenizer_files(source) if source else [])]


def plan_run(ctx: Ctx):
    plan_data = need("fairseq_ext.data_prep", "plan_data")
    build_corpus_view(ctx)
    summary = plan_data(str(ctx.layout.corpus), str(ctx.data_dir), **prepare_args(ctx, run_domains(ctx.config)))
    return [tokenizer_file(ctx), ctx.data_dir / "dict.txt", ctx.data_dir / "shards.json"], summary


PLAN_STAGE = Stage("data_plan", DataParams, data_units, data_inputs, plan_run)


@dataclass(frozen=True)
class ShardTaskParams(Params):
    task: int
    tasks: int


def shard_units(cfg: Config):
    n = cfg.corpus.shard_tasks
    return units_of([(f"t{k}", ShardTaskParams(k, n)) for k in range(n)])


def shard_inputs(ctx: Ctx) -> list[Path]:
    return [ctx.data_dir / "shards.json", tokenizer_file(ctx)]


def shard_run(ctx: Ctx):
    """Binarize this task's shards; the merge removes them, so they are not the record's outputs."""
    binarize_task = need("fairseq_ext.data_prep", "binarize_task")
    return [], binarize_task(str(ctx.data_dir), ctx.params.task, ctx.params.tasks, workers=workers())


SHARD_STAGE = Stage("data_shard", ShardTaskParams, shard_units, shard_inputs, shard_run,
                    after_ok=lambda cfg: ["data_plan"], array=True)


@dataclass(frozen=True)
class MergeParams(Params):
    domains: list[str]


def merge_units(cfg: Config):
    return units_of([(None, MergeParams(run_domains(cfg)))])


def merge_run(ctx: Ctx):
    merge_data = need("fairseq_ext.data_prep", "merge_data")
    merge_data(str(ctx.data_dir))
    return data_outputs(ctx, ctx.params.domains), {"domains": ctx.params.domains}


STAGE = Stage("data", MergeParams, merge_units, shard_inputs, merge_run, after_ok=lambda cfg: ["data_shard"])


# ---- data_incremental --------------------------------------------------------------------------

@dataclass(frozen=True)
class IncrementalDataParams(Params):
    corpus: str
    domains: list[str]  # the incremental domains
    new_domains: list[str]  # those not already prepared as eval domains
    text_field: str


def incremental_units(cfg: Config):
    new = [d for d in cfg.domains.incremental if d not in cfg.domains.eval]
    return units_of([("incremental", IncrementalDataParams(cfg.corpus.path, list(cfg.domains.incremental), new,
                                                           cfg.corpus.text_field))])


def incremental_inputs(ctx: Ctx) -> list[Path]:
    return [*corpus_files(Path(ctx.params.corpus), ctx.params.domains),
            tokenizer_file(ctx), ctx.data_dir / "dict.txt"]


def incremental_run(ctx: Ctx):
    """Binarize the new domains with the run's tokenizer (prepare_data skips finished domains)."""
    for d in ctx.params.domains:
        link_domain(ctx, d, Path(ctx.params.corpus) / d)
    prepare_more(ctx, ctx.params.domains)
    return data_outputs(ctx, ctx.params.domains), {}


INCREMENTAL_STAGE = Stage("data_incremental", IncrementalDataParams, incremental_units, incremental_inputs,
                          incremental_run, after_ok=lambda cfg: ["data"],
                          enabled=lambda cfg: bool(cfg.domains.incremental))
