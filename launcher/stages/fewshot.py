"""Few-shot evaluation with lm-evaluation-harness as ONE array job over (task, seed, method).

A few-shot config (YAML, e.g. examples/fewshot/paper.yaml; keys in ``FewshotConfig``) names the
tasks, the few-shot seeds, the demonstrations per prompt and the methods, each a set of
arguments of the harness model ``btm`` (fairseq_ext/lm_eval_btm.py). ``btm fewshot run CONFIG
--run-dir RUN`` expands it into elements (task x seed x method), writes the ones not done yet
to a manifest ``RUN/fewshot/<name>/manifest-<hash>.json`` (named by its content, so an array
still running keeps reading its own manifest) and runs them as one array job with the
project's executors and sbatch rendering (``RUN/fewshot/<name>/jobs/``).

Element i runs ``python -m launcher fewshot element MANIFEST --index i``. The index is explicit
in each element's command (submitit hands every element its own argv; it submits an array of
one as a plain job, which has no SLURM_ARRAY_TASK_ID); ``--dry-run`` and ``--check`` show the
script submitit submits and each element's command (``launcher.sbatch.submission``).

An element runs ``lm_eval.simple_evaluate`` on its task (``num_fewshot``, the seed as
``fewshot_random_seed``, ``limit``), appends one row per metric to the few-shot results table
``RUN/results/fewshot.{csv,parquet}`` (launcher/contract/results.py ``FEWSHOT``) and then writes
``RUN/fewshot/<name>/elements/<id>.json``. An element whose file holds the same spec is done:
running the command again runs only what is missing or changed.

lm_eval, torch and fairseq are imported only inside ``run_element``.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from launcher.contract import methods as registry
from launcher.contract.atomic import atomic_write_json, read_versioned_json
from launcher.contract.errors import BtmError, shown
from launcher.contract.names import validate_name

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples" / "fewshot"
MANIFEST_FORMAT = 1
PATH_ARGS = ("forest", "checkpoint", "clusters", "data_dir")  # resolved against the run dir


@dataclass
class FewshotMethod:
    label: str          # the element id's method part, e.g. cbtm_top1
    model_args: dict    # arguments of the harness model btm (BtmLMConfig)
    results_method: str | None = None  # the results' method column (default: from model_args)


@dataclass
class FewshotConfig:
    name: str
    tasks: list[str]
    seeds: list[int]
    num_fewshot: int
    methods: list[FewshotMethod]
    limit: int | float | None = None  # documents per task (None: all; < 1: a fraction)
    include_path: list[str] = field(default_factory=list)  # task YAML dirs (relative: to the config file)
    metadata: dict = field(default_factory=dict)  # lm_eval task metadata (e.g. corpus of the local tasks)
    batch_size: int = 8
    device: str = "cuda"  # falls back to the CPU where there is no GPU
    executor: str = "local"
    profile: str = "local"
    max_parallel: int = 8
    path: Path | None = None


def _where(path, key: str) -> str:
    return f"{path}: {key}"


def parse_config(data: dict, path: Path) -> FewshotConfig:
    """Validate a few-shot config mapping; errors name the file, the key and the value."""
    if not isinstance(data, dict):
        raise BtmError(f"{path}: a few-shot config must be a mapping")
    known = [f.name for f in dataclasses.fields(FewshotConfig) if f.name != "path"]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise BtmError(f"{path}: unknown key {shown(key)}" + (f"; did you mean {close[0]!r}?" if close else "")
                           + f" (known: {', '.join(known)})")
    for key in ("name", "tasks", "seeds", "num_fewshot", "methods"):
        if key not in data:
            raise BtmError(f"{path}: missing key {shown(key)}")
    name = validate_name(str(data["name"]), "few-shot config name")

    def int_list(key):
        value = data[key]
        if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in value):
            raise BtmError(f"{_where(path, key)} must be a non-empty list of integers, got {shown(value)}")
        return value

    tasks = data["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise BtmError(f"{_where(path, 'tasks')} must be a non-empty list of lm-eval task names, got {shown(tasks)}")
    tasks = [validate_name(str(t), "task name") for t in tasks]
    seeds = int_list("seeds")
    shots = data["num_fewshot"]
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise BtmError(f"{_where(path, 'num_fewshot')} must be an integer >= 0, got {shown(shots)}")
    methods_raw = data["methods"]
    if not isinstance(methods_raw, dict) or not methods_raw:
        raise BtmError(f"{_where(path, 'methods')} must map a label to btm model arguments, got {shown(methods_raw)}")
    methods = []
    for label, args in methods_raw.items():
        validate_name(str(label), "method label")
        if not isinstance(args, dict):
            raise BtmError(f"{_where(path, f'methods.{label}')} must be a mapping of btm model arguments, got {shown(args)}")
        args = dict(args)
        results_method = args.pop("results_method", None)
        if "checkpoint" in args and not results_method:
            raise BtmError(f"{_where(path, f'methods.{label}')}: a checkpoint is one model; say what it is "
                           "with results_method: dense, expert:<name>, average_uniform, ...")
        methods.append(FewshotMethod(str(label), args, results_method))
    cfg = FewshotConfig(name=name, tasks=tasks, seeds=seeds, num_fewshot=shots, methods=methods, path=path)
    for key in ("limit", "batch_size", "device", "executor", "profile", "max_parallel"):
        if key in data and data[key] is not None:
            setattr(cfg, key, data[key])
    if cfg.limit is not None and (isinstance(cfg.limit, bool) or not isinstance(cfg.limit, (int, float))
                                  or cfg.limit <= 0):
        raise BtmError(f"{_where(path, 'limit')} must be a positive number or null, got {shown(cfg.limit)}")
    for key in ("batch_size", "max_parallel"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BtmError(f"{_where(path, key)} must be an integer >= 1, got {shown(value)}")
    if cfg.executor not in ("local", "slurm"):
        raise BtmError(f"{_where(path, 'executor')} must be local or slurm, got {shown(cfg.executor)}")
    include = data.get("include_path") or []
    include = [include] if isinstance(include, str) else include
    if not isinstance(include, list) or not all(isinstance(p, str) for p in include):
        raise BtmError(f"{_where(path, 'include_path')} must be a directory or a list of them, got {shown(include)}")
    cfg.include_path = [str((path.parent / p).resolve()) for p in include]
    for p in cfg.include_path:
        if not Path(p).is_dir():
            raise BtmError(f"{_where(path, 'include_path')}: task directory {p} does not exist")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BtmError(f"{_where(path, 'metadata')} must be a mapping, got {shown(metadata)}")
    cfg.metadata = metadata
    return cfg


def load_config(name_or_path: str) -> FewshotConfig:
    """A few-shot config file, or the name of one in examples/fewshot/ (``paper``, ``local``)."""
    from launcher.user_yaml import read_user_yaml

    path = Path(name_or_path)
    if not path.is_file():
        path = EXAMPLES / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in EXAMPLES.glob("*.yaml"))
            raise BtmError(f"no few-shot config {shown(name_or_path)} (a YAML file, or one of {', '.join(known)})")
    return parse_config(read_user_yaml(path, "few-shot config"), path.resolve())


# ----------------------------------------------------------------------------- elements

def resolve_model_args(args: dict, run_dir: Path) -> dict:
    """The btm model arguments with paths made absolute against the run dir; ``forest``
    defaults to the run dir (unless a single ``checkpoint`` is given)."""
    out = {k: v for k, v in args.items()}
    if "checkpoint" not in out:
        out.setdefault("forest", ".")
    for key in PATH_ARGS:
        if key in out and out[key] is not None:
            out[key] = str((run_dir / str(out[key])).resolve())
    if isinstance(out.get("prior"), str) and out["prior"].endswith(".json"):
        out["prior"] = str((run_dir / out["prior"]).resolve())
    return out


def element_id(task: str, seed: int, label: str) -> str:
    return validate_name(f"{task}.s{seed}.{label}", "few-shot element id")


def elements(cfg: FewshotConfig, run_dir: Path) -> list[dict]:
    """Every (task, seed, method) element, self-contained (all an element run needs)."""
    run_dir = Path(run_dir).resolve()
    out = []
    for task in cfg.tasks:
        for seed in cfg.seeds:
            for m in cfg.methods:
                out.append({"id": element_id(task, seed, m.label), "run": cfg.name, "task": task, "seed": seed,
                            "method": m.label, "results_method": m.results_method,
                            "model_args": resolve_model_args(m.model_args, run_dir),
                            "num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "batch_size": cfg.batch_size,
                            "device": cfg.device, "include_path": list(cfg.include_path),
                            "metadata": dict(cfg.metadata), "results_run_dir": str(run_dir)})
    return out


def fewshot_dir(run_dir: Path, cfg: FewshotConfig) -> Path:
    return Path(run_dir).resolve() / "fewshot" / cfg.name


def element_file(out_dir: Path, element: dict) -> Path:
    return Path(out_dir) / "elements" / f"{element['id']}.json"


def is_done(out_dir: Path, element: dict) -> bool:
    """The element's file exists and was written for this very spec."""
    try:
        old = json.loads(element_file(out_dir, element).read_text())
    except (OSError, ValueError):
        return False
    return old.get("element") == _spec(element)


def _spec(element: dict) -> dict:
    return {k: v for k, v in element.items() if k != "index"}


def write_manifest(out_dir: Path, pending: list[dict], *, write: bool = True) -> tuple[Path, dict]:
    """The manifest of the pending elements, indexed 0..n-1 in order; named by its content."""
    manifest = {"format": MANIFEST_FORMAT, "dir": str(out_dir),
                "elements": [{"index": i, **_spec(e)} for i, e in enumerate(pending)]}
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(out_dir) / f"manifest-{digest}.json"
    if write:
        atomic_write_json(path, manifest)
    return path, manifest


def read_element(manifest_path: Path, index: int) -> tuple[dict, dict]:
    manifest = read_versioned_json(manifest_path, what="few-shot manifest", key="format", version=MANIFEST_FORMAT,
                                   missing=f"no few-shot manifest at {manifest_path}")
    items = manifest.get("elements") or []
    if not 0 <= index < len(items):
        raise BtmError(f"element index {index} is outside {manifest_path} ({len(items)} elements)")
    if items[index].get("index") != index:
        raise BtmError(f"{manifest_path}: element {index} says it is index {shown(items[index].get('index'))}")
    return manifest, items[index]


# ----------------------------------------------------------------------------- the job

def fewshot_job(element_ids: list[str], profile):
    """The one array job (launcher.plan.Job) of the pending elements: one GPU each."""
    from launcher.plan import Job, Unit, job_resources

    return Job(name="fewshot", stage="fewshot", units=[Unit(i) for i in element_ids], array=True,
               **job_resources(profile, "fewshot", 1))


def element_argv(manifest: Path, index: int) -> list[str]:
    """``fewshot element MANIFEST --index I`` (after ``python -m launcher``)."""
    return ["fewshot", "element", str(manifest), "--index", str(index)]


# ----------------------------------------------------------------------------- results rows

def describe_method(model_args: dict, results_method: str | None, n_experts: int,
                    n_clusters: int | None = None) -> dict:
    """The results columns method, k, routing, prior (and n_clusters) of a btm model setup.

    The method is the registered one whose lm-eval arguments these are
    (``launcher.contract.methods.from_lm_eval``). k = experts that score each option: 1 for one
    model, min(top_k, N) or N otherwise (for a parameter average: the experts averaged, as the
    eval stage counts it)."""
    if "checkpoint" in model_args:
        return {"method": results_method, "k": 1, "routing": "none", "prior": "none"}
    method = registry.from_lm_eval(model_args)
    kind = registry.get_method(method).kind
    routing = model_args.get("routing", "token")
    top_k = model_args.get("top_k")
    k = n_experts if top_k is None else min(int(top_k), n_experts)
    prior = model_args.get("prior")
    prior_label = "uniform" if not prior else (Path(prior).name if str(prior).endswith(".json") else str(prior))
    if kind == "expert":
        out = {"method": f"{registry.EXPERT_PREFIX}{model_args.get('expert')}", "k": 1, "routing": "none",
               "prior": "none"}
    elif kind == "cluster":
        temperature = float(model_args.get("temperature", 0.1))
        settings = f"T={temperature:g}" + (f",stride={int(model_args.get('stride', 32))}" if routing == "token" else "")
        out = {"method": method, "k": k, "routing": f"{routing}:tfidf-svd({settings})", "prior": "none",
               "n_clusters": n_clusters}
    elif kind == "average":
        out = {"method": method, "k": k, "routing": "none", "prior": prior_label if prior else "none"}
    elif registry.get_method(method).mixing_rule == "posterior":
        out = {"method": method, "k": k, "routing": f"{routing}:posterior", "prior": prior_label}
    elif registry.get_method(method).mixing_rule == "uniform":
        out = {"method": method, "k": n_experts, "routing": "fixed", "prior": "none"}
    else:  # a fixed prior: all experts, or the top k
        out = {"method": method, "k": k, "routing": "fixed", "prior": prior_label}
    if results_method:
        out["method"] = results_method
    return out


def rows_from_lm_eval(results: dict, element: dict, described: dict, forward_passes: int,
                      seconds: float) -> list[dict]:
    """One few-shot table row per (task, metric, filter) of lm_eval's results dict."""
    import math

    rows = []
    n_samples = results.get("n-samples", {})
    higher = results.get("higher_is_better", {})
    for task, metrics in results.get("results", {}).items():
        samples = (n_samples.get(task) or {}).get("effective") or sum(
            (v or {}).get("effective", 0) for v in n_samples.values())
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, flt = key.split(",", 1)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            hib = (higher.get(task) or {}).get(metric)
            rows.append({"run": element["run"], "task": task, "metric": metric, "filter": flt,
                         "value": float(value), **{k: v for k, v in described.items() if v is not None},
                         "num_fewshot": element["num_fewshot"], "seed": element["seed"],
                         "samples": int(samples), "expert_forward_passes": int(forward_passes),
                         "seconds": float(seconds),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool)
                         and math.isfinite(stderr) else None,
                         "better": None if hib is None else ("higher" if hib else "lower")})
    if not rows:
        raise BtmError(f"lm_eval returned no numeric metric for task {shown(element['task'])}")
    return rows


# ----------------------------------------------------------------------------- one element

def run_element(manifest_path: str | Path, index: int) -> int:
    """Evaluate element ``index`` of the manifest (see the module doc); 0 when done."""
    import os
    import time

    manifest, element = read_element(Path(manifest_path), index)
    out_dir = Path(manifest["dir"])
    if is_done(out_dir, element):
        print(f"fewshot {element['id']}: already done ({element_file(out_dir, element)})")
        return 0
    print(f"fewshot {element['id']}: task {element['task']}, seed {element['seed']}, "
          f"method {element['method']}, {element['num_fewshot']} demonstrations", flush=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fairseq_ext import lm_eval_btm  # registers the model "btm"; imports lm_eval
    import lm_eval
    from lm_eval.tasks import TaskManager

    from launcher.contract.results import append_fewshot

    t0 = time.perf_counter()
    lm = lm_eval_btm.BtmLM(batch_size=element["batch_size"], device=element["device"], **element["model_args"])
    tm = TaskManager(include_path=element["include_path"] or None, metadata=element["metadata"] or None)
    results = lm_eval.simple_evaluate(model=lm, tasks=[element["task"]], num_fewshot=element["num_fewshot"],
                                      limit=element["limit"], task_manager=tm, log_samples=False,
                                      fewshot_random_seed=element["seed"])
    seconds = time.perf_counter() - t0
    mixture = lm.mixture
    described = describe_method(element["model_args"], element["results_method"], len(mixture.names),
                                mixture.cluster_model.k if mixture.cluster_model is not None else None)
    rows = rows_from_lm_eval(results, element, described, lm.forward_sequences, seconds)
    append_fewshot(element["results_run_dir"], rows)
    keep = {k: results.get(k) for k in ("results", "n-samples", "higher_is_better", "versions", "n-shot")}
    atomic_write_json(element_file(out_dir, element),
                      {"element": _spec(element), "rows": rows, "lm_eval": json.loads(json.dumps(keep, default=str))})
    mixture.close()
    print(f"fewshot {element['id']}: {len(rows)} result row(s) in "
          f"{Path(element['results_run_dir']) / 'results' / 'fewshot.csv'}", flush=True)
    return 0
