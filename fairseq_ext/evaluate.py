"""Forest evaluation: score every (model, domain, split) once, then every method is mixing.

``evaluate_forest`` for each eval domain:
1. scores every expert on the prior split (``valid``) and estimates the domain prior, both
   cached (``EvalDirs.scores``, ``EvalDirs.priors``), when a method needs the prior;
2. scores the experts the requested methods need on the eval split (``test``): all of them for
   single-expert rows and dense ensembles, only the k experts with the highest cached prior for
   ``topk_prior`` with k < N (the sparse ensemble; nothing else is run);
3. mixes (``fairseq_ext/ensemble.py``) for every method and k and returns one results row per
   result (the launcher appends them to the results table, ``launcher/contract/results.py``).
So changing the methods, k or prior settings costs only mixing (and, for new prior settings,
re-estimating the prior from cached held-out scores).

Methods are those of the registry (``launcher/contract/methods.py``) that mix cached scores:
``experts`` (one row ``expert:<name>`` per expert), the ensembles (each with its registered
``mixing_rule``: uniform, the cached prior, the posterior over the document prefix, the
previous-token rule; the ``random_split`` baseline is the uniform ensemble of its experts) and
``topk_prior`` (the k experts with the highest cached prior, their prior renormalized).
Parameter averages and merges (``fairseq_ext.merging``) are built by ``average_forest`` and scored
like any single model
(``evaluate_model``); c-BTM's routed mixture is ``fairseq_ext/evaluate_cbtm.py``.

Model code never sees a run directory: the caller passes the plain directories (``EvalDirs``)
and files the rows it gets back.

Cost columns: ``expert_forward_passes`` is the number of sequences run through a model *in
this call* to produce the eval-split scores the row uses (a score shared by several rows counts
in each of them; cached scores count 0; the held-out scoring for the prior is not included);
``seconds`` is that scoring time plus the row's mixing time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from launcher.contract import methods as registry
from launcher.contract.atomic import atomic_write_json
from launcher.contract.errors import BtmError
from launcher.contract.names import validate_name
from fairseq_ext import ensemble
from fairseq_ext.priors import CachedPrior, PriorSettings, cached_domain_prior, stack_scores
from fairseq_ext.scoring import (ContextSettings, cache_key, cache_path, checkpoint_sha256, data_hash,
                                score_split)

AVERAGE_RULES = tuple(m.name.split("_", 1)[1] for m in registry.METHODS if m.kind == "average")


def is_score_mix(name: str) -> bool:
    """Whether ``evaluate_forest`` computes the registered method ``name``: single experts,
    ensembles, top-k, and a baseline that is an ensemble (random_split)."""
    m = registry.get_method(name)
    return m.kind in ("expert", "ensemble", "topk") or (m.kind == "baseline" and m.mixing_rule is not None)


@dataclass(frozen=True)
class EvalDirs:
    """The directories evaluation reads and writes (the launcher takes them from RunLayout)."""
    data: Path  # prepared data (``btm data prepare``)
    scores: Path  # per-token score cache
    priors: Path  # cached domain priors
    averages: Path | None = None  # parameter averages (average_forest only)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, Path(value))


@dataclass(frozen=True)
class EvalSettings:
    methods: tuple[str, ...] = field(default=registry.FOREST_MIXES, metadata={
        "help": "registered methods to mix: experts, ensemble_*, topk_prior, random_split "
                "(launcher/contract/methods.py)"})
    top_k: tuple[int, ...] = field(default=(1,), metadata={"help": "k values for topk_prior"})
    split: str = field(default="test", metadata={"help": "split the results are reported on"})
    prior: PriorSettings = field(default_factory=PriorSettings, metadata={"help": "cached prior settings"})
    context: ContextSettings = field(default_factory=ContextSettings, metadata={"help": "scoring context"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    trust_checkpoint: bool = field(default=False, metadata={
        "help": "let checkpoints that need pickle load (the CLI's --trust-checkpoint; only for files "
                "you trust); without it they are refused, naming the file and the flag"})

    def validate(self) -> "EvalSettings":
        """These settings with every method under its registered name, or BtmError."""
        methods = tuple(dict.fromkeys(registry.canonical(m) for m in self.methods))
        for m in methods:
            if not is_score_mix(m):
                raise BtmError(f"evaluation method {m!r} is not a mix of cached scores; "
                               f"known here: {', '.join(n for n in registry.REGISTRY if is_score_mix(n))}")
        for k in self.top_k:
            if not isinstance(k, int) or k < 1:
                raise BtmError(f"top-k values must be integers >= 1, got {k!r}")
        validate_name(self.split, "split")
        validate_name(self.prior.split, "prior split")
        self.prior.validate()
        return dataclasses.replace(self, methods=methods)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_experts(experts: dict[str, Path], scorer: "Scorer | None" = None,
                  needed: list[tuple[str, str]] = (), *, trust_pickle: bool = False) -> None:
    """Before any scoring: every checkpoint exists, and all share dictionary and architecture.

    The compatibility check loads (and hashes) every checkpoint; it is skipped when ``scorer``
    already has every (domain, split) in ``needed`` cached for every expert, i.e. when nothing
    will be scored (a re-mix). Those scores all passed the dictionary check against DATA."""
    from fairseq_ext.merging.compat import check_compatible

    if not experts:
        raise BtmError("no experts to evaluate")
    for name, path in experts.items():
        validate_name(name, "expert name")
        if not Path(path).is_file():
            raise BtmError(f"expert {name!r}: checkpoint {path} does not exist")
    if scorer is not None and needed and all(scorer.is_cached(p, d, s) for p in experts.values()
                                             for d, s in needed):
        return
    try:
        check_compatible([str(p) for p in experts.values()], trust_pickle=trust_pickle)
    except BtmError as e:
        raise BtmError(f"the experts cannot form one forest: {e}") from None


# ----------------------------------------------------------------------------- scoring

class Scorer:
    """Scores (model, domain, split) once per call and remembers the result."""

    def __init__(self, dirs: EvalDirs, settings: EvalSettings):
        self.cache_dir = dirs.scores
        self.data_dir = dirs.data
        self.settings = settings
        self.device = resolve_device(settings.device)
        self._done: dict[tuple[str, str, str], object] = {}
        self._sha: dict[str, str] = {}

    def sha(self, checkpoint: Path) -> str:
        if str(checkpoint) not in self._sha:
            self._sha[str(checkpoint)] = checkpoint_sha256(checkpoint)
        return self._sha[str(checkpoint)]

    def is_cached(self, checkpoint: Path, domain: str, split: str) -> bool:
        """Whether the score file for this (checkpoint, domain, split) exists (no scoring)."""
        key = cache_key(self.sha(checkpoint), data_hash(self.data_dir, domain, split), self.settings.context)
        return cache_path(self.cache_dir, domain, split, key).exists()

    def __call__(self, checkpoint: Path, domain: str, split: str):
        key = (str(checkpoint), domain, split)
        if key not in self._done:
            self.sha(checkpoint)
            self._done[key] = score_split(checkpoint, self.data_dir, domain, split,
                                          cache_dir=self.cache_dir, context=self.settings.context,
                                          device=self.device, batch_size=self.settings.batch_size,
                                          checkpoint_sha=self._sha[str(checkpoint)],
                                          trust_pickle=self.settings.trust_checkpoint)
        return self._done[key]


def result_row(run: str, method: str, k: int, prior: str, domain: str, split: str, logprobs: np.ndarray,
               scores: list, mix_seconds: float) -> dict:
    """One row of the results table (launcher/contract/results.py) for mixed log-probs."""
    nll = ensemble.nll(logprobs)
    return {"run": run, "method": method, "k": k, "prior": prior, "eval_domain": domain, "split": split,
            "tokens": int(logprobs.shape[0]), "nll": nll, "ppl": float(np.exp(nll)),
            "expert_forward_passes": int(sum(s.forward_passes for s in scores)),
            "seconds": float(sum(s.seconds for s in scores) + mix_seconds)}


def prescore(checkpoint: str | os.PathLike, domain: str, dirs: EvalDirs,
             settings: EvalSettings = EvalSettings()) -> list:
    """Fill the score cache for one (model, domain): the prior split and the eval split, so an
    evaluation with the same ``settings`` afterwards only mixes."""
    settings = settings.validate()
    scorer = Scorer(dirs, settings)
    splits = dict.fromkeys([settings.prior.split, settings.split])
    return [scorer(Path(checkpoint), domain, split) for split in splits]


def domain_prior(dirs: EvalDirs, scorer: Scorer, experts: dict[str, Path], domain: str,
                 settings: PriorSettings) -> CachedPrior:
    """The cached prior of ``domain`` over ``experts`` (scoring the held-out split if needed)."""
    heldout = [scorer(path, domain, settings.split) for path in experts.values()]
    names = {name: s.key["checkpoint_sha256"] for name, s in zip(experts, heldout)}
    return cached_domain_prior(dirs.priors, domain, names, heldout, settings)


# ----------------------------------------------------------------------------- evaluation

def evaluate_forest(experts: dict[str, Path], eval_domains: list[str], dirs: EvalDirs, *,
                    settings: EvalSettings = EvalSettings(), run_name: str) -> list[dict]:
    """The results rows of the forest ``experts`` on each eval domain, one per method and k."""
    settings = settings.validate()
    for d in eval_domains:
        validate_name(d, "eval domain")
    scorer = Scorer(dirs, settings)
    splits = dict.fromkeys([settings.prior.split, settings.split])
    check_experts(experts, scorer, [(d, s) for d in eval_domains for s in splits],
                  trust_pickle=settings.trust_checkpoint)
    rows = []
    for domain in eval_domains:
        rows += _domain_rows(experts, domain, dirs, scorer, settings, run_name)
    return rows


def _domain_rows(experts: dict[str, Path], domain: str, dirs: EvalDirs, scorer: Scorer,
                 settings: EvalSettings, run: str) -> list[dict]:
    names, methods, split = list(experts), settings.methods, settings.split
    n = len(names)
    prior, prior_label = None, settings.prior.describe()
    if registry.needs_prior(methods):
        cached = domain_prior(dirs, scorer, experts, domain, settings.prior)
        prior, prior_label = cached.prior, settings.prior.describe(cached.temperature)
    ensembles = [m for m in methods if registry.get_method(m).kind in ("ensemble", "baseline")]

    def scores_of(selected: list[str]) -> list:
        return [scorer(experts[name], domain, split) for name in selected]

    rows = []
    if registry.EXPERTS in methods or ensembles:
        all_scores = scores_of(names)
        lp, starts = stack_scores(all_scores)
    if registry.EXPERTS in methods:
        for j, name in enumerate(names):
            t0 = time.perf_counter()
            out = lp[j].astype(np.float64)
            rows.append(result_row(run, f"{registry.EXPERT_PREFIX}{name}", 1, "none", domain, split, out,
                                   [all_scores[j]], time.perf_counter() - t0))
    for method in ensembles:
        rule = registry.get_method(method).mixing_rule
        t0 = time.perf_counter()
        out = ensemble.ensemble_logprobs(lp, starts, method=rule, prior=prior)
        rows.append(result_row(run, method, n, "none" if rule == "uniform" else prior_label, domain, split,
                               out, all_scores, time.perf_counter() - t0))
    for method in (m for m in methods if registry.get_method(m).kind == "topk"):
        rule = registry.get_method(method).mixing_rule
        for k in sorted(set(min(k, n) for k in settings.top_k)):
            keep = ensemble.topk_experts(prior, k)
            selected = scores_of([names[j] for j in keep])  # only these k experts are scored
            t0 = time.perf_counter()
            k_lp, k_starts = stack_scores(selected)
            out = ensemble.ensemble_logprobs(k_lp, k_starts, method=rule, prior=prior[keep])
            rows.append(result_row(run, method, k, prior_label, domain, split, out, selected,
                                   time.perf_counter() - t0))
    return rows


def evaluate_model(method: str, checkpoint: str | os.PathLike, eval_domains: list[str], dirs: EvalDirs, *,
                   settings: EvalSettings = EvalSettings(), k: int = 1, prior: str = "none",
                   run_name: str) -> list[dict]:
    """The results rows of one model (``dense``, ``average_*``, ...) on each eval domain."""
    settings = settings.validate()
    scorer = Scorer(dirs, settings)
    rows = []
    for domain in eval_domains:
        validate_name(domain, "eval domain")
        scores = scorer(Path(checkpoint), domain, settings.split)
        rows.append(result_row(run_name, method, k, prior, domain, settings.split,
                               scores.logprobs.astype(np.float64), [scores], 0.0))
    return rows


# ----------------------------------------------------------------------------- averaging

def average_weights(rule: str, prior: np.ndarray | None, n: int) -> np.ndarray:
    """Parameter-averaging weights: uniform 1/N, argmax one-hot on the highest prior, posterior
    the prior itself."""
    if rule == "uniform":
        return np.full(n, 1.0 / n)
    if prior is None:
        raise BtmError(f"average method {rule!r} needs the target domain's prior")
    if rule == "argmax":
        return np.eye(n)[int(np.argmax(prior))]
    if rule == "posterior":
        return np.asarray(prior, dtype=np.float64) / np.sum(prior)
    raise BtmError(f"unknown average method {rule!r}; known: {', '.join(AVERAGE_RULES)}")


@dataclass(frozen=True)
class MergeSpec:
    """How ``average_forest`` combines the weighted experts: a method of ``fairseq_ext.merging``
    (``linear`` is today's parameter average), its parameters (defaults for the rest), the seed
    of DARE's random drop, and the base task vectors are measured from (None: the parent the
    experts' branch.json records)."""
    method: str = "linear"
    params: dict = field(default_factory=dict, hash=False)
    seed: int = 0
    base: Path | None = None


def _merge_record(merge: MergeSpec, experts: dict[str, Path], trust_pickle: bool) -> dict | None:
    """average.json's ``merge`` entry: method, every parameter (defaults filled in), seed and the
    resolved base (path, sha256); None for the linear average (its record predates merges)."""
    if merge.method == "linear":
        if merge.params or merge.base is not None:
            raise BtmError("the linear average takes no parameters and no base")
        return None
    from fairseq_ext.checkpoint import verify_checkpoint
    from fairseq_ext.merging import get_method, make_params
    from fairseq_ext.merging.base import resolve_base

    rule = get_method(merge.method)
    params = dataclasses.asdict(make_params(rule, merge.params))
    base = None
    if rule.needs_base:
        try:
            path = resolve_base([str(p) for p in experts.values()], merge.base)
        except BtmError as e:
            raise BtmError(f"{rule.name} merges task vectors around the experts' base: {e}") from None
        base = {"path": str(path), "sha256": verify_checkpoint(path)}
    return {"method": rule.name, "params": params, "seed": int(merge.seed), "base": base}


def average_forest(experts: dict[str, Path], method: str, target_domain: str | None, dirs: EvalDirs, *,
                   settings: EvalSettings = EvalSettings(), name: str | None = None,
                   merge: MergeSpec = MergeSpec()) -> dict:
    """Merge the experts' parameters with weights from ``method`` (uniform, argmax, posterior:
    the cached prior of ``target_domain`` for the last two) and the rule ``merge`` (default:
    the linear average) into ``dirs.averages/<name>/`` (checkpoint.pt + model.safetensors +
    average.json). Re-running with the same inputs (experts, weights, prior settings, merge
    method, parameters, seed and base) reuses the model; anything else rebuilds it.

    Returns the contents of average.json (``checkpoint``, ``weights``, ``prior`` label,
    ``merge`` (None for the linear average), ...).
    """
    settings = settings.validate()
    if method not in AVERAGE_RULES:
        raise BtmError(f"unknown average method {method!r}; known: {', '.join(AVERAGE_RULES)}")
    if method != "uniform" and not target_domain:
        raise BtmError(f"average method {method!r} needs --target-domain (whose prior gives the weights)")
    if dirs.averages is None:
        raise BtmError("average_forest needs the averages directory (EvalDirs.averages)")
    if target_domain:
        validate_name(target_domain, "target domain")
    default = method if merge.method == "linear" else f"{merge.method}_{method}"
    name = validate_name(name or (default if method == "uniform" else f"{default}.{target_domain}"),
                         "average name")
    check_experts(experts, trust_pickle=settings.trust_checkpoint)
    merge_info = _merge_record(merge, experts, settings.trust_checkpoint)
    prior, prior_label = None, "none"
    if method != "uniform":
        cached = domain_prior(dirs, Scorer(dirs, settings), experts, target_domain, settings.prior)
        prior, prior_label = cached.prior, f"{settings.prior.describe(cached.temperature)},target={target_domain}"
    weights = average_weights(method, prior, len(experts))
    out_dir = dirs.averages / name
    record = {"method": method, "target_domain": target_domain, "experts": list(experts),
              "expert_sha256": {n: checkpoint_sha256(p) for n, p in experts.items()},
              "weights": [float(w) for w in weights],
              "prior": prior_label,
              # as JSON reads it back (tuples are lists), so the comparison below can match
              "prior_settings": json.loads(json.dumps(asdict(settings.prior))) if prior is not None else None,
              "checkpoint": str(out_dir / "checkpoint.pt"), "safetensors": str(out_dir / "model.safetensors")}
    if merge_info is not None:
        record["merge"] = merge_info
    meta = out_dir / "average.json"
    if meta.exists() and (out_dir / "checkpoint.pt").exists():
        old = json.loads(meta.read_text())
        if {k: old.get(k) for k in record} == record and ("merge" in record or old.get("merge") is None):
            return old
    record["sha256"] = _write_merge(experts, weights, out_dir, merge_info, settings.trust_checkpoint)
    atomic_write_json(meta, record)
    return record


def _write_merge(experts: dict[str, Path], weights: np.ndarray, out_dir: Path, merge_info: dict | None,
                 trust_pickle: bool) -> str:
    """Write the merged checkpoint.pt and model.safetensors into ``out_dir``; its sha256."""
    # Experts with weight 0 (argmax) add nothing; leave them out.
    used = [(str(p), float(w)) for p, w in zip(experts.values(), weights) if w > 0]
    paths, used_weights = [p for p, _ in used], [w for _, w in used]
    out = dict(safetensors_path=out_dir / "model.safetensors", trust_pickle=trust_pickle)
    if merge_info is None:
        from fairseq_ext.averaging import average_checkpoints

        return average_checkpoints(paths, used_weights, out_dir / "checkpoint.pt", **out)["sha256"]
    from fairseq_ext.merging import merge_checkpoints

    base = merge_info["base"]["path"] if merge_info["base"] else None
    return merge_checkpoints(paths, used_weights, out_dir / "checkpoint.pt", method=merge_info["method"],
                             params=merge_info["params"], base=base, seed=merge_info["seed"],
                             **out)["sha256"]
