"""The run config: one YAML file, read into the dataclasses of ``launcher.config_schema`` and
validated.

Every error names the file, the key (dotted path) and, where YAML tells us, the line:
unknown keys get a did-you-mean, wrong types say what was expected, unknown presets,
profiles and domains list what is known. Named configs live in ``launcher/configs/*.yaml``
and are loaded by name (``btm run tiny``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from launcher.config_schema import EVAL_METHODS, MIXTURES, Config
from launcher.contract.errors import BtmError, shown
from launcher.contract.layout import reserved_name_collision
from launcher.contract.methods import BASELINES
from launcher.contract.names import validate_name
from launcher.contract.presets import PRESETS
from launcher.hf_config import check_hf_sources, resolve_hf_paths, validate_hf_keys
from launcher.user_yaml import load_bounded, read_user_text

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

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
    cfg = parse_config(read_user_text(path, "config"), str(path), overrides)
    if corpus is not None:
        cfg.corpus.path = str(Path(corpus).resolve())
    elif cfg.corpus.path and not Path(cfg.corpus.path).is_absolute():
        cfg.corpus.path = str((path.parent / cfg.corpus.path).resolve())
    resolve_hf_paths(cfg, path.parent)
    fill_domains_from_corpus(cfg)
    check_corpus_domains(cfg)
    check_hf_sources(cfg)
    return cfg
