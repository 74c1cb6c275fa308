"""The run config: one YAML file, validated into dataclasses.

Every error names the file, the key (dotted path) and, where YAML tells us, the line:
unknown keys get a did-you-mean, wrong types say what was expected, unknown presets,
profiles and domains list what is known. Named configs live in ``launcher/configs/*.yaml``
and are loaded by name (``btm run tiny``).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.contract.errors import BtmError, shown
from launcher.contract.layout import reserved_name_collision
from launcher.contract.methods import BASELINES, CONFIG_METHODS
from launcher.contract.names import validate_name
from launcher.contract.presets import PRESETS
from launcher.hf_config import check_hf_sources, resolve_hf_paths, validate_hf_keys
from launcher.user_yaml import load_bounded

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Evaluation methods and baselines a config may ask for: launcher.contract.methods.
EVAL_METHODS = CONFIG_METHODS
# Every numeric field declares its range in its metadata ("min" or exclusive "above", "max" or
# exclusive "below"), checked when the config is read: --dry-run refuses a bad value, not a
# stage hours later or the cluster.
# vocab_size: 4 special + 256 byte pieces + 1 learned, the bound fairseq_ext.data_prep checks.
MIN_VOCAB_SIZE = 4 + 256 + 1


@dataclass
class CorpusConfig:
    path: str | None = field(default=None, metadata={"help": "corpus directory CORPUS/<domain>/<split>.jsonl[.gz]; relative to the config file; --corpus overrides"})
    text_field: str = field(default="text", metadata={"help": "JSON field holding the document text"})
    vocab_size: int = field(default=8000, metadata={"help": "sentencepiece vocabulary size", "min": MIN_VOCAB_SIZE})
    tokenizer: str | None = field(default=None, metadata={"help": "hf:PATH: encode with that transformers directory's tokenizer.json instead of training sentencepiece (docs/data.md); relative to the config file"})
    shard_mb: float = field(default=256.0, metadata={"help": "data prep cuts each split file into shards of about this many MB (a smaller file is one shard); docs/data.md", "above": 0})
    shard_tasks: int = field(default=1, metadata={"help": "tasks of the data_shard array that binarize the shards (each a pool of its CPUs)", "min": 1})


@dataclass
class DomainsConfig:
    train: list[str] = field(default_factory=list, metadata={"help": "training domains, one expert each (btm); not set: every domain folder of the corpus"})
    eval: list[str] = field(default_factory=list, metadata={"help": "evaluation domains (may overlap train); not set: every domain folder of the corpus"})
    incremental: list[str] = field(default_factory=list, metadata={"help": "domains added to an existing forest, branched by `branching`"})


MIXTURES = ("balanced", "proportional")  # or a mapping {temperature: T}


@dataclass
class DataConfig:
    mixture: Any = field(default="balanced", metadata={"help": "how the seed LM and the dense baseline sample training domains: balanced (equal shares, the BTM paper's) | proportional (to tokens) | {temperature: T} (p_i ∝ tokens_i^(1/T))"})


@dataclass
class ModelConfig:
    preset: str = field(default="tiny", metadata={"help": f"model preset: {', '.join(PRESETS)}"})
    arch: str | None = field(default=None, metadata={"help": "layout: gpt2 | llama (default: the preset's; must be the preset's)"})
    init: str | None = field(default=None, metadata={"help": "hf:PATH: the seed LM is this local transformers model (GPT-2 or Llama family), trained on for budget.seed_fraction of the budget (0: used as is); relative to the config file"})


@dataclass
class BudgetConfig:
    total_updates: int | None = field(default=None, metadata={"help": "updates of the compute-matched dense run (default: the preset's)", "min": 1})
    gpus: int | None = field(default=None, metadata={"help": "GPUs of the dense run; total budget = total_updates x gpus (default: the preset's)", "min": 1})
    seed_fraction: float = field(default=0.5, metadata={"help": "share of the budget spent training the seed LM (0 = experts start from random init, or from model.init as is)", "min": 0.0, "below": 1.0})
    save_interval_updates: int = field(default=100, metadata={"help": "checkpoint_last every this many updates", "min": 1})


@dataclass
class BranchingConfig:
    rule: str = field(default="posterior", metadata={"help": "how incremental experts start: seed | posterior (weighted average of the top-k experts)"})
    top_k: int = field(default=2, metadata={"help": "experts averaged by the posterior rule", "min": 1})
    sample_docs: int = field(default=32, metadata={"help": "documents of the new domain used to estimate the posterior", "min": 1})


@dataclass
class ClustersConfig:
    k: int = field(default=4, metadata={"help": "number of clusters = experts (method: cbtm)", "min": 1})
    assign_tasks: int = field(default=1, metadata={"help": "tasks of the cluster_assign array (each assigns a contiguous slice of the corpus)", "min": 1})


@dataclass
class EvaluationConfig:
    split: str = field(default="test", metadata={"help": "split scored: valid | test"})
    methods: list[str] = field(default_factory=lambda: ["experts", "ensemble_uniform", "ensemble_posterior", "average_uniform"],
                               metadata={"help": f"evaluation methods: {', '.join(EVAL_METHODS)}"})
    top_k: int = field(default=1, metadata={"help": "experts kept by top-k mixing", "min": 1})
    prior_estimator: str = field(default="document", metadata={
        "help": "cached prior: document (whole-document Bayes posterior) | block_end (DEMix's "
                "previous-token posterior at each block's end, blocks of the preset's tokens_per_sample)"})
    prior_temperatures: list[float] = field(default_factory=lambda: [1.0], metadata={
        "help": "prior temperatures T (prior**(1/T)); several: the one best on the valid split"})


@dataclass
class MoeConfig:
    enabled: bool = field(default=False, metadata={"help": "turn the forest into one Mixture-of-Experts model and train it (stage moe, after merge)"})
    top_k: int = field(default=2, metadata={"help": "experts each token is routed to (<= number of experts)", "min": 1})
    router_init: str = field(default="zero", metadata={"help": "zero | data (each expert's mean hidden state on its own domain)"})
    weights: str = field(default="uniform", metadata={"help": "averaging weights of embeddings, attention, norms: uniform | posterior (mean cached prior over the training domains)"})
    train: str = field(default="all", metadata={"help": "router (routers only) | all (every parameter)"})
    budget_share: float = field(default=0.1, metadata={"help": "share of the budget's updates spent training the MoE (taken from the experts' updates)", "above": 0.0, "below": 1.0})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss", "min": 0.0})


@dataclass
class Config:
    name: str = field(default="run", metadata={"help": "run name (the `run` column of the results table)"})
    method: str = field(default="btm", metadata={"help": "btm (one expert per domain) | cbtm (one expert per cluster)"})
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    branching: BranchingConfig = field(default_factory=BranchingConfig)
    clusters: ClustersConfig = field(default_factory=ClustersConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    baselines: list[str] = field(default_factory=list, metadata={"help": "dense and/or random_split"})
    executor: str = field(default="local", metadata={"help": "local | slurm"})
    profile: str = field(default="local", metadata={"help": "cluster profile: slurm_templates/profiles/<name>.yaml or a path"})
    max_parallel: int = field(default=8, metadata={"help": "array throttle %K; local executor worker cap (also bounded by cores)", "min": 1})
    seed: int = field(default=1, metadata={"help": "random seed", "min": 0, "max": 2**32 - 1})
    # Where the config came from (for error messages); not part of the YAML.
    source: str = field(default="<config>", metadata={"internal": True})

    # ---- derived -------------------------------------------------------------------------
    @property
    def preset(self):
        return PRESETS[self.model.preset]

    @property
    def total_updates(self) -> int:
        return self.budget.total_updates or self.preset.total_updates

    @property
    def total_gpus(self) -> int:
        return self.budget.gpus or self.preset.gpus

    @property
    def expert_names(self) -> list[str]:
        """The base forest's experts: one per training domain (btm) or cluster (cbtm)."""
        if self.method == "cbtm":
            return [f"cluster_{i}" for i in range(self.clusters.k)]  # fairseq_ext.cluster.cluster_name
        return list(self.domains.train)

    @property
    def all_domains(self) -> list[str]:
        seen: dict[str, None] = {}
        for d in [*self.domains.train, *self.domains.incremental, *self.domains.eval]:
            seen[d] = None
        return list(seen)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# ---- loading -----------------------------------------------------------------------------

class _Locator:
    """Maps dotted key paths to YAML line numbers, for error messages."""

    def __init__(self, node):
        self.lines: dict[str, int] = {}
        if node is not None:
            self._walk(node, "")

    def _walk(self, node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                self.lines[key] = k.start_mark.line + 1
                self._walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self.lines[f"{prefix}[{i}]"] = v.start_mark.line + 1

    def where(self, source: str, key: str) -> str:
        line = self.lines.get(key)
        return f"{source}:{line}" if line else source


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str, err) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints accepted for floats)."""
    if tp is Any:
        return value  # checked by _validate (a key that takes several shapes)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, err)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            err(key, f"expected a list of {_type_name(inner)}, got {type(value).__name__} {shown(value)}")
        return [_coerce(v, inner, f"{key}[{i}]", err) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, err)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            err(key, f"expected a number, got {type(value).__name__} {shown(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            err(key, f"expected an integer, got {type(value).__name__} {shown(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            err(key, f"expected a string, got {type(value).__name__} {shown(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            err(key, f"expected true or false, got {shown(value)}")
        return value
    raise TypeError(f"unsupported config type {tp}")  # a bug in this module, not user input


def _build(cls, data: Any, prefix: str, err):
    if not isinstance(data, dict):
        err(prefix, f"expected a mapping, got {type(data).__name__} {shown(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            err(path, f"unknown key {shown(key)}{hint}")
        kwargs[key] = _coerce(value, hints[key], path, err)
        _check_range(kwargs[key], fields[key].metadata, path, err)
    return cls(**kwargs)


def _check_range(value, meta: dict, key: str, err) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high, below, above = meta.get("min"), meta.get("max"), meta.get("below"), meta.get("above")
    if value != value or (low is not None and value < low) or (high is not None and value > high) \
            or (below is not None and value >= below) or (above is not None and value <= above):
        def num(x, unbounded):  # 0.0 -> 0; 4294967295 stays whole
            return unbounded if x is None else str(int(x)) if float(x).is_integer() else str(x)
        upper = f"{num(below, '')})" if below is not None else f"{num(high, 'inf')}]"
        lower = f"({num(above, '')}" if above is not None else f"[{num(low, '-inf')}"
        err(key, f"must be in {lower}, {upper}, got {value}")


def parse_config(text: str, source: str = "<config>", overrides: dict | None = None) -> Config:
    """Parse and validate config YAML text. ``overrides``: dotted keys -> values (CLI flags)."""
    data, node = load_bounded(text, source)
    locator = _Locator(node)

    def err(key: str, message: str):
        shown_key = key if len(key) <= 120 else f"{key[:120]}..."  # a key may be a pasted megabyte
        raise BtmError(f"{locator.where(source, key)}: {shown_key}: {message}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BtmError(f"{source}: expected a mapping of config keys at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    cfg = _build(Config, data, "", err)
    cfg.source = source
    _validate(cfg, err)
    return cfg


def _validate(cfg: Config, err) -> None:
    def name(value: str, key: str) -> None:
        try:
            validate_name(value, key)
        except BtmError as e:
            err(key, str(e))

    name(cfg.name, "name")
    if cfg.method not in ("btm", "cbtm"):
        err("method", f"unknown method {shown(cfg.method)}; use btm or cbtm")
    if cfg.model.preset not in PRESETS:
        close = difflib.get_close_matches(cfg.model.preset, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        err("model.preset", f"unknown model preset {shown(cfg.model.preset)}{hint}; known: {', '.join(PRESETS)}")
    for section in ("train", "eval", "incremental"):
        values = getattr(cfg.domains, section)
        for i, d in enumerate(values):
            name(d, f"domains.{section}[{i}]")
            if reserved_name_collision(d):
                err(f"domains.{section}[{i}]", f"domain name {d!r} is reserved: it collides with "
                    f"{reserved_name_collision(d)}; rename the corpus directory")
        dup = {d for d in values if values.count(d) > 1}
        if dup:
            err(f"domains.{section}", f"domain listed twice: {', '.join(sorted(dup))}")
    both = set(cfg.domains.train) & set(cfg.domains.incremental)
    if both:
        err("domains.incremental", f"already a training domain: {', '.join(sorted(both))}")
    if cfg.method == "cbtm" and cfg.domains.incremental:
        err("domains.incremental", "incremental domains are for method: btm")
    _validate_mixture(cfg.data.mixture, err)
    validate_hf_keys(cfg, err)
    if cfg.branching.rule not in ("seed", "posterior"):
        err("branching.rule", f"unknown branching rule {shown(cfg.branching.rule)}; use seed or posterior")
    if cfg.evaluation.split not in ("valid", "test"):
        err("evaluation.split", f"unknown split {shown(cfg.evaluation.split)}; use valid or test")
    if cfg.evaluation.prior_estimator not in ("document", "block_end"):
        err("evaluation.prior_estimator", f"unknown prior estimator {shown(cfg.evaluation.prior_estimator)}; "
            "use document or block_end")
    if not cfg.evaluation.prior_temperatures:
        err("evaluation.prior_temperatures", "must list at least one temperature")
    for i, t in enumerate(cfg.evaluation.prior_temperatures):
        if not (math.isfinite(t) and t > 0):
            err(f"evaluation.prior_temperatures[{i}]", f"must be a positive finite number, got {t}")
    for i, m in enumerate(cfg.evaluation.methods):
        if m not in EVAL_METHODS:
            close = difflib.get_close_matches(m, EVAL_METHODS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(EVAL_METHODS)}"
            err(f"evaluation.methods[{i}]", f"unknown evaluation method {shown(m)}{hint}")
    for i, b in enumerate(cfg.baselines):
        if b not in BASELINES:
            err(f"baselines[{i}]", f"unknown baseline {shown(b)}; known: {', '.join(BASELINES)}")
    _validate_moe(cfg, err)
    if cfg.executor not in ("local", "slurm"):
        err("executor", f"unknown executor {shown(cfg.executor)}; use local or slurm")
    if "/" not in cfg.profile and not cfg.profile.endswith(".yaml"):
        name(cfg.profile, "profile")
        from launcher.profile_files import known_profiles

        if cfg.profile not in known_profiles():
            close = difflib.get_close_matches(cfg.profile, known_profiles(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            err("profile", f"unknown cluster profile {shown(cfg.profile)}{hint}; known: {', '.join(known_profiles())}")


def _validate_moe(cfg: Config, err) -> None:
    moe = cfg.moe
    if cfg.expert_names:  # else the domains come from the corpus: checked once they are known
        check_moe_experts(cfg, err)
    for key, allowed in (("router_init", ("zero", "data")), ("weights", ("uniform", "posterior")),
                         ("train", ("router", "all"))):
        if getattr(moe, key) not in allowed:
            err(f"moe.{key}", f"unknown value {getattr(moe, key)!r}; use {' or '.join(allowed)}")
    if moe.enabled and not 0.0 < moe.budget_share < 1.0 - cfg.budget.seed_fraction:
        err("moe.budget_share", f"must be in (0, 1 - budget.seed_fraction = "
                                f"{1.0 - cfg.budget.seed_fraction:g}), got {moe.budget_share}")


def check_moe_experts(cfg: Config, err) -> None:
    """The MoE settings that depend on the number of experts."""
    moe, n = cfg.moe, len(cfg.expert_names)
    if moe.enabled and n < 2:
        err("moe.enabled", f"a MoE needs at least 2 experts; the config has {n}")
    if moe.enabled and not 1 <= moe.top_k <= n:
        err("moe.top_k", f"must be in 1..{n} (the experts), got {moe.top_k}")


def _validate_mixture(mixture: Any, err) -> None:
    key = "data.mixture"
    if isinstance(mixture, str):
        if mixture not in MIXTURES:
            close = difflib.get_close_matches(mixture, MIXTURES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            err(key, f"unknown mixture {shown(mixture)}{hint}; use balanced, proportional or {{temperature: T}}")
        return
    if not isinstance(mixture, dict) or set(mixture) != {"temperature"}:
        err(key, f"expected balanced, proportional or a mapping {{temperature: T}}, got {shown(mixture)}")
    t = mixture["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        err(f"{key}.temperature", f"must be a finite number > 0, got {shown(t)}")


def mixture_label(mixture: Any) -> str:
    """The mixture as the --dry-run header shows it: balanced, proportional or temperature T."""
    return mixture if isinstance(mixture, str) else f"temperature {mixture['temperature']}"


def corpus_domains(corpus: str) -> list[str]:
    """The corpus's domains: its folders (CORPUS/<domain>/<split>.jsonl...), sorted by name."""
    return sorted(p.name for p in Path(corpus).iterdir() if p.is_dir() and not p.name.startswith("."))


def fill_domains_from_corpus(cfg: Config) -> None:
    """A config that names no training (evaluation) domains takes every domain folder of the
    corpus: the paper configs run as written on any corpus of the documented layout."""
    empty = [s for s in ("train", "eval") if not getattr(cfg.domains, s)]
    if not empty:
        return
    where = f"{cfg.source}: domains.{empty[0]}"
    if not cfg.corpus.path:
        raise BtmError(f"{where}: not set, so every domain folder of the corpus is taken, but corpus.path "
                       "is not set; pass --corpus DIR (or name the domains)")
    if not Path(cfg.corpus.path).is_dir():
        raise BtmError(f"{where}: not set, so every domain folder of the corpus is taken, but corpus.path "
                       f"{cfg.corpus.path} is not a directory")
    found = corpus_domains(cfg.corpus.path)
    if not found:
        raise BtmError(f"{where}: not set, and corpus {cfg.corpus.path} has no domain folders "
                       "(expected CORPUS/<domain>/<split>.jsonl)")
    for d in found:
        validate_name(d, f"domain folder of corpus {cfg.corpus.path}")
    for section in empty:
        setattr(cfg.domains, section, list(found))

    def err(key: str, message: str):
        raise BtmError(f"{cfg.source}: {key}: {message} (domains.train not set: every folder of corpus "
                       f"{cfg.corpus.path})")
    check_moe_experts(cfg, err)
    both = set(cfg.domains.train) & set(cfg.domains.incremental)
    if both:
        raise BtmError(f"{cfg.source}: domains.incremental: {', '.join(sorted(both))} would also be training "
                       f"domains (domains.train is not set: every folder of corpus {cfg.corpus.path}); name domains.train")


def check_corpus_domains(cfg: Config) -> None:
    """Every configured domain must exist in the corpus (when the corpus is there to look at)."""
    if not cfg.corpus.path or not Path(cfg.corpus.path).is_dir():
        return
    have = corpus_domains(cfg.corpus.path)
    for section in ("train", "eval", "incremental"):
        for i, d in enumerate(getattr(cfg.domains, section)):
            if d not in have:
                close = difflib.get_close_matches(d, have, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise BtmError(f"{cfg.source}: domains.{section}[{i}]: unknown domain {shown(d)} "
                               f"(not a directory of corpus {cfg.corpus.path}){hint}; "
                               f"known: {', '.join(have)}")


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: dict | None = None,
                corpus: str | Path | None = None) -> Config:
    """Load a config file, or a named config from ``launcher/configs``.

    A relative ``corpus.path`` is resolved against the config file's directory; ``corpus``
    (the ``--corpus`` flag) overrides it. Domain sections left unset are filled with every
    domain folder of the corpus (``fill_domains_from_corpus``).
    """
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path) in named_configs():
            path = CONFIG_DIR / f"{name_or_path}.yaml"
        else:
            close = difflib.get_close_matches(str(name_or_path), named_configs(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BtmError(f"config {shown(str(name_or_path))} is neither a file nor a named config{hint}; "
                           f"named configs: {', '.join(named_configs())}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BtmError(f"cannot read config {path}: {e}") from None
    cfg = parse_config(text, str(path), overrides)
    if corpus is not None:
        cfg.corpus.path = str(Path(corpus).resolve())
    elif cfg.corpus.path and not Path(cfg.corpus.path).is_absolute():
        cfg.corpus.path = str((path.parent / cfg.corpus.path).resolve())
    resolve_hf_paths(cfg, path.parent)
    fill_domains_from_corpus(cfg)
    check_corpus_domains(cfg)
    check_hf_sources(cfg)
    return cfg
