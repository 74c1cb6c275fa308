"""``btm stage RUN_DIR STAGE --unit NAME``: run one unit of one stage, then record it.

The same entry point runs locally, in an sbatch (array) task and by hand. It loads the run's
resolved ``config.yaml``, finds the unit's parameters (``launcher.plan``), returns at once if
the unit's record is current, otherwise does the work by calling the model/data/eval packages'
Python APIs and writes the record atomically. Heavy imports happen inside the stage functions.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from launcher.contract.atomic import atomic_write_json, atomic_write_text
from launcher.config import Config, load_config
from launcher.contract.errors import PREEMPTED_EXIT, BtmError
from launcher.contract.forest import FOREST_FILE, editing
from launcher.plan import Unit, find_unit
from launcher.records import HashCache, hash_files, now, read_record, record_is_current, write_record


class Preempted(Exception):
    """The unit saved its state on SIGUSR2/SIGTERM; exit PREEMPTED_EXIT to be requeued."""


@dataclass
class Ctx:
    run_dir: Path
    config: Config
    unit: Unit
    nproc: int = 1  # training processes on this node (one per GPU of the task)

    @property
    def params(self) -> dict:
        return self.unit.params

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    def domain_files(self, domains, splits=("train",)) -> list[Path]:
        return [self.data_dir / d / f"{s}.{ext}" for d in domains for s in splits for ext in ("bin", "idx")]

    def model_dir(self, name: str) -> Path:
        if name == "seed":
            return self.run_dir / "seed"
        if name == "dense":
            return self.run_dir / "dense"
        return self.run_dir / "experts" / name


@dataclass
class StageImpl:
    inputs: Callable[[Ctx], list[Path]]
    run: Callable[[Ctx], tuple[list[Path], dict]]  # -> (outputs, extra record fields)


def _need(module: str, attr: str):
    """Import ``module.attr`` or explain which part of btm is missing."""
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BtmError(f"this stage needs {module}.{attr}, which is not available: {e}") from None


def _device() -> str:
    """BTM_DEVICE, else the GPU SLURM gave us, else the CPU."""
    if os.environ.get("BTM_DEVICE"):
        return os.environ["BTM_DEVICE"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n))


# ---- data -----------------------------------------------------------------------------------

def _corpus_files(corpus: Path, domains) -> list[Path]:
    out = []
    for d in domains:
        if not (corpus / d).is_dir():
            raise BtmError(f"corpus {corpus} has no domain directory {d!r}")
        out += sorted(p for p in (corpus / d).iterdir() if p.is_file() and p.name.split(".")[0] in ("train", "valid", "test"))
    return out


def _read_docs(path: Path, text_field: str) -> list[str]:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if ".jsonl" in path.name:
            return [json.loads(line)[text_field] for line in f if line.strip()]
        return [d for d in f.read().split("\n\n") if d.strip()]


def _link(view: Path, name: str, target: Path) -> None:
    link = view / name
    if link.is_symlink() and link.resolve() != target.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(target.resolve(), target_is_directory=True)


def build_corpus_view(ctx: Ctx) -> Path:
    """``RUN_DIR/corpus``: the configured domains (symlinks) + the random-split baseline's domains.

    ``random<i>`` holds every n-th document of the pooled training domains after a seeded
    shuffle, per split: the paper's random-split forest sees the same data as the domain forest.
    """
    corpus = Path(ctx.params["corpus"])
    view = ctx.run_dir / "corpus"
    view.mkdir(parents=True, exist_ok=True)
    for d in ctx.params["domains"]:
        _link(view, d, corpus / d)
    n = ctx.params.get("random_split", 0)
    for split in ("train", "valid", "test") if n else ():
        docs = []
        for d in ctx.params["train_domains"]:
            for p in sorted((corpus / d).glob(f"{split}.*")):
                docs += _read_docs(p, ctx.params["text_field"])
        random.Random(ctx.config.seed).shuffle(docs)
        for i in range(n):
            lines = "".join(json.dumps({ctx.params["text_field"]: t}) + "\n" for t in docs[i::n])
            atomic_write_text(view / f"random{i}" / f"{split}.jsonl", lines)
    return view


def _prepare(ctx: Ctx, domains: list[str]) -> dict:
    prepare_data = _need("fairseq_ext.data_prep", "prepare_data")
    return prepare_data(str(ctx.run_dir / "corpus"), str(ctx.data_dir), domains=domains,
                        train_domains=list(ctx.config.domains.train), vocab_size=ctx.config.corpus.vocab_size,
                        text_field=ctx.config.corpus.text_field, workers=_workers(), seed=ctx.config.seed,
                        progress=False)


def _data_outputs(ctx: Ctx, domains) -> list[Path]:
    return [ctx.data_dir / "spm.model", ctx.data_dir / "dict.txt",
            *ctx.domain_files(domains, ("train", "valid", "test"))]


def data_inputs(ctx: Ctx) -> list[Path]:
    return _corpus_files(Path(ctx.params["corpus"]), ctx.params["domains"])


def data_run(ctx: Ctx):
    build_corpus_view(ctx)
    domains = [*ctx.params["domains"], *[f"random{i}" for i in range(ctx.params.get("random_split", 0))]]
    _prepare(ctx, domains)
    return _data_outputs(ctx, domains), {"domains": domains}


def data_incremental_inputs(ctx: Ctx) -> list[Path]:
    return [*_corpus_files(Path(ctx.params["corpus"]), ctx.params["domains"]),
            ctx.data_dir / "spm.model", ctx.data_dir / "dict.txt"]


def data_incremental_run(ctx: Ctx):
    """Binarize the new domains with the run's tokenizer (prepare_data skips finished domains)."""
    view = ctx.run_dir / "corpus"
    for d in ctx.params["domains"]:
        _link(view, d, Path(ctx.params["corpus"]) / d)
    manifest = json.loads((ctx.data_dir / "manifest.json").read_text())
    have = sorted({key.split("/")[0] for key in manifest.get("datasets", {})} | set(manifest.get("domains", [])))
    _prepare(ctx, [*have, *[d for d in ctx.params["domains"] if d not in have]])
    return _data_outputs(ctx, ctx.params["domains"]), {}


# ---- clusters (c-BTM) -----------------------------------------------------------------------

def cluster_inputs(ctx: Ctx) -> list[Path]:
    return [*_corpus_files(Path(ctx.params["corpus"]), ctx.params["domains"]), ctx.data_dir / "dict.txt"]


def cluster_run(ctx: Ctx):
    """Cluster the training domains' documents; each cluster becomes a domain of the run's data."""
    build = _need("fairseq_ext.cluster", "build_cluster_domains")
    p = ctx.params
    out = build(str(ctx.run_dir / "corpus"), str(ctx.run_dir / "clusters"), p["k"], seed=p["seed"],
                domains=p["domains"], text_field=p["text_field"])
    view = ctx.run_dir / "corpus"
    for name in out["domains"]:
        _link(view, name, Path(out["corpus_dir"]) / name)
    manifest = json.loads((ctx.data_dir / "manifest.json").read_text())
    have = sorted({key.split("/")[0] for key in manifest.get("datasets", {})} | set(manifest.get("domains", [])))
    _prepare(ctx, [*have, *[d for d in out["domains"] if d not in have]])
    return _data_outputs(ctx, out["domains"]), {"clusters": out["domains"], "cluster_report": out.get("report")}


# ---- training (seed, experts, dense, incremental experts) -----------------------------------

def accumulation_steps(tokens_per_batch: int, preset_name: str, nproc: int) -> int:
    """Micro-batches per update so that no process holds more than the preset's per-GPU batch.

    The batch is the budget's (all of the run's nominal GPUs); a job with fewer GPUs (a seed
    or dense run whose budget names more GPUs than one node has) accumulates instead of
    growing each GPU's share. The result does not depend on it (fairseq_ext/train.py).
    """
    from launcher.contract.presets import get_preset

    preset = get_preset(preset_name)
    sequences = tokens_per_batch // preset.tokens_per_sample
    least = max(1, math.ceil(sequences / (nproc * preset.sequences_per_gpu)))
    for steps in range(least, max(sequences // nproc, least) + 1):
        if sequences % (nproc * steps) == 0:
            return steps
    return least  # no even split: the trainer names the numbers


def _train(ctx: Ctx, save_dir: Path, init: Path | None):
    TrainSpec = _need("fairseq_ext.train", "TrainSpec")
    train_lm = _need("fairseq_ext.train", "train_lm")
    p = ctx.params
    spec = TrainSpec(data_dir=str(ctx.data_dir), domains=list(p["domains"]), save_dir=str(save_dir),
                     preset=p["preset"], init=str(init) if init else None, max_updates=p["max_updates"],
                     save_interval_updates=p["save_interval_updates"], tokens_per_batch=p["tokens_per_batch"],
                     update_freq=accumulation_steps(p["tokens_per_batch"], p["preset"], ctx.nproc),
                     seed=p["seed"], device=os.environ.get("BTM_DEVICE", "auto"))
    resumed = _resume_point(save_dir)
    if ctx.nproc > 1:
        result = _need("fairseq_ext.multiproc", "train_lm_torchrun")(spec, ctx.nproc)
    else:
        result = train_lm(spec)
    if result.preempted:
        raise Preempted()
    outs = [save_dir / "checkpoint_last.pt", save_dir / "checkpoint_best.pt"]
    extra = {"train": {"num_updates": result.num_updates, "tokens": result.num_updates * p["tokens_per_batch"],
                       "valid_losses": result.valid_losses, "best_valid_loss": result.best_valid_loss,
                       "tokens_per_second": result.tokens_per_second, "resumed": resumed}}
    return [o for o in outs if o.exists()], extra


def _resume_point(save_dir: Path) -> dict | None:
    """Where a resumed run picks up: checkpoint_last exists; last update in train_log.jsonl."""
    if not (save_dir / "checkpoint_last.pt").exists():
        return None
    last = 0
    try:
        for line in (save_dir / "train_log.jsonl").read_text().splitlines():
            try:
                last = max(last, int(json.loads(line).get("update", 0)))
            except (ValueError, AttributeError):
                continue
    except OSError:
        pass
    return {"checkpoint_last_existed": True, "last_logged_update": last}


def _branch(ctx: Ctx, save_dir: Path, parents: dict[str, float], method: str) -> Path:
    """``init.pt`` = the weighted average of the parents (names -> weights); branch.json by branch_expert."""
    branch_expert = _need("fairseq_ext.branch", "branch_expert")
    init = save_dir / "init.pt"
    if (save_dir / "checkpoint_last.pt").exists() and init.exists():
        return init  # resuming (requeue): the trainer continues from checkpoint_last
    paths = {str(ctx.model_dir(n) / "checkpoint_last.pt"): w for n, w in parents.items()}
    branch_expert(paths, str(init), method=method, info={"parent_names": parents})
    return init


def _parents_by_name(save_dir: Path) -> dict[str, float]:
    try:
        return dict(json.loads((save_dir / "branch.json").read_text()).get("parent_names", {}))
    except (OSError, ValueError):
        return {}


def seed_inputs(ctx: Ctx) -> list[Path]:
    return [ctx.data_dir / "dict.txt", *ctx.domain_files(ctx.params["domains"], ("train", "valid"))]


def seed_run(ctx: Ctx):
    return _train(ctx, ctx.model_dir("seed"), None)


def train_inputs(ctx: Ctx) -> list[Path]:
    ins = [ctx.data_dir / "dict.txt", *ctx.domain_files(ctx.params["domains"], ("train", "valid"))]
    if ctx.params["init"] == "seed":
        ins.append(ctx.model_dir("seed") / "checkpoint_last.pt")
    return ins


def train_run(ctx: Ctx):
    save_dir = ctx.model_dir(ctx.params["name"])
    save_dir.mkdir(parents=True, exist_ok=True)
    init = _branch(ctx, save_dir, {"seed": 1.0}, "seed") if ctx.params["init"] == "seed" else None
    outs, extra = _train(ctx, save_dir, init)
    return outs, extra


def dense_inputs(ctx: Ctx) -> list[Path]:
    return [ctx.data_dir / "dict.txt", *ctx.domain_files(ctx.params["domains"], ("train", "valid"))]


def dense_run(ctx: Ctx):
    return _train(ctx, ctx.model_dir("dense"), None)


def grow_inputs(ctx: Ctx) -> list[Path]:
    ins = [ctx.data_dir / "dict.txt", *ctx.domain_files(ctx.params["domains"], ("train", "valid"))]
    if ctx.params["init"] == "seed":
        return [*ins, ctx.model_dir("seed") / "checkpoint_last.pt"]
    return [*ins, *[ctx.model_dir(n) / "checkpoint_last.pt" for n in ctx.params["parents"]]]


def grow_run(ctx: Ctx):
    """Incremental BTM: branch from the posterior-weighted top-k experts, train, join the forest."""
    name = ctx.params["name"]
    save_dir = ctx.model_dir(name)
    save_dir.mkdir(parents=True, exist_ok=True)
    if ctx.params["init"] == "seed":
        parents, method = {"seed": 1.0}, "seed"
    elif (save_dir / "checkpoint_last.pt").exists() and _parents_by_name(save_dir):
        parents, method = _parents_by_name(save_dir), "posterior"  # resuming
    else:
        branch_weights = _need("fairseq_ext.priors", "branch_weights")
        ckpts = {n: str(ctx.model_dir(n) / "checkpoint_last.pt") for n in ctx.params["parents"]}
        weights = branch_weights(ckpts, str(ctx.data_dir), name, "train", ctx.params["sample_docs"],
                                 ctx.params["top_k"], cache_dir=str(ctx.run_dir / "scores"), device=_device())
        parents, method = {n: float(w) for n, w in weights.items() if w > 0}, "posterior"
    init = _branch(ctx, save_dir, parents, method)
    outs, extra = _train(ctx, save_dir, init)
    with editing(ctx.run_dir / FOREST_FILE, ctx.config.name) as forest:
        forest.add(name, ctx.params["domains"], save_dir / "checkpoint_last.pt", parents=parents,
                   updates=extra["train"]["num_updates"], tokens=extra["train"]["tokens"],
                   metrics={"valid_losses": extra["train"]["valid_losses"]}, replace=True)
    return [*outs, save_dir / "branch.json"], {**extra, "parents": parents}


# ---- merge ----------------------------------------------------------------------------------

def merge_inputs(ctx: Ctx) -> list[Path]:
    return [p for n in ctx.params["experts"] if (p := ctx.model_dir(n) / "checkpoint_last.pt").exists()]


def merge_run(ctx: Ctx):
    """forest.json from every finished expert; fail naming the missing ones (after writing)."""
    missing, cache = [], HashCache(ctx.run_dir)
    with editing(ctx.run_dir / FOREST_FILE, ctx.config.name) as forest:
        for name in ctx.params["experts"]:
            unit = find_unit(ctx.config, "train", name)
            rec = read_record(ctx.run_dir, "train", name)
            if not record_is_current(rec, unit.params, cache):
                missing.append(name)
                continue
            d = ctx.model_dir(name)
            train = rec.get("train", {})
            forest.add(name, unit.params["domains"], d / "checkpoint_last.pt", parents=_parents_by_name(d),
                       updates=train.get("num_updates", 0), tokens=train.get("tokens", 0),
                       metrics={"valid_losses": train.get("valid_losses", {})},
                       sha256=rec["outputs"].get(cache.rel(d / "checkpoint_last.pt")), replace=True)
        forest.missing = missing
    cache.save()
    if missing:
        raise BtmError(f"forest.json written without {len(missing)} expert(s) that did not finish: "
                       f"{', '.join(missing)}; run `btm run` again to train only those")
    # forest.json is not a recorded output: incremental experts and `btm forest` edit it later
    # without making the merge stale. The eval stage takes it as an input instead.
    return [], {"experts": ctx.params["experts"]}


# ---- scoring, evaluation, report ------------------------------------------------------------

def _model_checkpoint(ctx: Ctx, model: str) -> Path:
    return ctx.model_dir(model) / "checkpoint_last.pt"


def score_inputs(ctx: Ctx) -> list[Path]:
    p = ctx.params
    return [_model_checkpoint(ctx, p["model"]), *ctx.domain_files(p["domains"], p["splits"])]


def score_run(ctx: Ctx):
    """Fill the per-token log-prob cache that the eval stage mixes (same cache key as evaluate)."""
    score_split = _need("fairseq_ext.scoring", "score_split")
    p = ctx.params
    outputs, tokens, passes = [], 0, 0
    for domain in p["domains"]:
        for split in p["splits"]:
            scores = score_split(str(_model_checkpoint(ctx, p["model"])), str(ctx.data_dir), domain, split,
                                 cache_dir=str(ctx.run_dir / "scores"), device=_device())
            outputs.append(Path(scores.path))
            tokens += int(len(scores.logprobs))
            passes += scores.forward_passes
    return outputs, {"tokens": tokens, "forward_passes": passes}


def eval_inputs(ctx: Ctx) -> list[Path]:
    p = ctx.params
    models = [*p["experts"], *(["dense"] if "dense" in p["baselines"] else [])]
    return [ctx.run_dir / FOREST_FILE, *[_model_checkpoint(ctx, m) for m in models]]


def eval_run(ctx: Ctx):
    from launcher.stages_eval import evaluate_run

    evaluate_run(ctx, _device())
    res = ctx.run_dir / "results"
    return [q for q in (res / "results.csv", res / "results.parquet") if q.exists()], {}


def report_inputs(ctx: Ctx) -> list[Path]:
    return [ctx.run_dir / "results" / "results.csv"]


def report_run(ctx: Ctx):
    build_report = _need("analysis.report", "build_report")
    path = build_report([str(ctx.run_dir)])
    return [Path(path)], {}


STAGES: dict[str, StageImpl] = {
    "data": StageImpl(data_inputs, data_run),
    "data_incremental": StageImpl(data_incremental_inputs, data_incremental_run),
    "cluster": StageImpl(cluster_inputs, cluster_run),
    "seed": StageImpl(seed_inputs, seed_run),
    "train": StageImpl(train_inputs, train_run),
    "dense": StageImpl(dense_inputs, dense_run),
    "merge": StageImpl(merge_inputs, merge_run),
    "grow": StageImpl(grow_inputs, grow_run),
    "score": StageImpl(score_inputs, score_run),
    "eval": StageImpl(eval_inputs, eval_run),
    "report": StageImpl(report_inputs, report_run),
}


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise BtmError(f"{run_dir} is not a btm run directory (no config.yaml); start it with `btm run`")
    return load_config(path)


def unit_from_units_file(units_file: str | Path) -> str | None:
    """An array task's unit: its index (SLURM_ARRAY_TASK_ID) in the units file written at submit."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        raise BtmError("--units-file needs SLURM_ARRAY_TASK_ID (run inside an array job, or pass --unit)")
    names = json.loads(Path(units_file).read_text())
    index = int(task)
    if not 0 <= index < len(names):
        raise BtmError(f"array task {index} is outside {units_file} ({len(names)} units)")
    return names[index]


def run_stage(run_dir: str | Path, stage: str, unit_name: str | None, force: bool = False,
              nproc: int = 1) -> int:
    """Run one unit; 0 = done (now or before), PREEMPTED_EXIT = saved, requeue me.

    ``nproc`` > 1: a training stage trains on that many processes of this node (torchrun).
    """
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    unit = find_unit(cfg, stage, unit_name)
    impl = STAGES[stage]
    if nproc < 1:
        raise BtmError(f"--nproc-per-node must be >= 1, got {nproc}")
    ctx = Ctx(run_dir, cfg, unit, nproc)
    cache = HashCache(run_dir)
    label = f"{stage}" + (f" {unit_name}" if unit_name else "")
    if not force and record_is_current(read_record(run_dir, stage, unit_name), unit.params, cache):
        print(f"{label}: already done (record is current)")
        return 0
    missing = [p for p in impl.inputs(ctx) if not p.exists()]
    if missing:
        raise BtmError(f"{label}: missing input(s) {', '.join(map(str, missing[:5]))} (has the upstream stage run?)")
    inputs = hash_files(cache, impl.inputs(ctx))
    started = now()
    print(f"{label}: started {started}", flush=True)
    try:
        outputs, extra = impl.run(ctx)
    except Preempted:
        print(f"{label}: saved its state; exiting {PREEMPTED_EXIT} to be requeued", flush=True)
        return PREEMPTED_EXIT
    write_record(run_dir, stage, unit_name, params=unit.params, config_hash=cfg.config_hash(),
                 inputs=inputs, outputs=hash_files(cache, outputs), started=started, extra=extra,
                 config=cfg.to_dict())
    cache.save()
    print(f"{label}: done", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - use `python -m launcher stage`
    sys.exit("use: python -m launcher stage RUN_DIR STAGE [--unit NAME]")
