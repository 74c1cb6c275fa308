"""The evaluation methods: one registry that every layer reads.

A method is a way of turning a forest (or one model of a run) into per-token log-probs. Its
``name`` is what a config asks for in ``evaluation.methods`` and what the ``method`` column of
the results table holds (one-expert rows are ``expert:<name>``; a config asks for them all with
``experts``). Everything else about a method lives here too, so adding one is one new
``EvalMethod`` line plus the code that computes it:

- ``kind``: which part of the eval stage computes it (``expert``, ``ensemble``, ``topk``,
  ``average``, ``merge``, ``cluster``, ``baseline``, ``moe``);
- ``mixing_rule``: the rule of ``fairseq_ext.ensemble.ensemble_logprobs`` (ensembles and top-k);
- ``needs_prior``: whether it reads the cached domain prior (so the score stage also scores
  the prior split);
- ``label``: its name in report tables and plots;
- ``lm_eval``: the ``btm`` lm-eval model arguments that run it few-shot (None: not available);
  a value ``GIVEN`` means "any value": ``top_k`` makes a prior ensemble the top-k one, a
  ``prior`` makes the average the posterior one (``from_lm_eval`` reads them back);
- ``aliases``: other spellings a command line accepts (``btm eval --methods expert``).

The order of ``METHODS`` is the order of the paper's tables.

The ``merge`` methods are generated: ``merge_<method>_<weighting>`` for each merge method of
``fairseq_ext.merging`` other than linear (whose weightings are the ``average_*`` methods) and
each weighting (``uniform``: one model for every domain; ``posterior``: one model per eval
domain, weighted by that domain's cached prior, as ``average_posterior``).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from launcher.contract.errors import BtmError

EXPERT_PREFIX = "expert:"
EXPERTS = "experts"  # the config's name for "every expert:<name> row"
_EXPERT_METHOD = re.compile(r"expert:[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
GIVEN = "<given>"  # an lm_eval argument that selects a method by being given, whatever its value

# The cached prior's default temperature candidates (prior ** (1/T); the one whose fixed-prior
# ensemble has the lowest nll on the valid split is used). Measured on btm-forest (2 seeds, valid
# split, ensemble with cached prior; docs/results.md): choosing T among these gave mean perplexity
# 163.8 on the training domains and 352.3 on the eval domains, against 164.1 and 373.4 for T=1
# (the plain document posterior) and 214.0 and 373.7 for DEMix's block_end estimator.
# `evaluation.prior_temperatures: [1]` gives the untempered prior back.
PRIOR_TEMPERATURES: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)


# The merge methods of fairseq_ext.merging other than linear, with their table labels (this
# package does not import fairseq_ext; tests/test_merge_eval.py checks the names against
# fairseq_ext.merging.method_names()), and the weightings a merge method is evaluated with.
MERGE_LABELS: dict[str, str] = {"task_arithmetic": "Task arithmetic", "ties": "TIES",
                                "dare_ties": "DARE-TIES", "dare_linear": "DARE-linear",
                                "model_stock": "Model stock"}
MERGE_WEIGHTINGS: tuple[str, ...] = ("uniform", "posterior")


@dataclass(frozen=True)
class EvalMethod:
    name: str
    kind: str
    label: str
    needs_prior: bool = False
    mixing_rule: str | None = None
    lm_eval: dict | None = field(default=None, hash=False, compare=False)
    in_config: bool = True  # asked for in evaluation.methods (baselines are asked for in `baselines`)
    aliases: tuple[str, ...] = ()


METHODS: tuple[EvalMethod, ...] = (
    EvalMethod("dense", "baseline", "Dense", lm_eval={}, in_config=False),
    EvalMethod("random_split", "baseline", "Random split", mixing_rule="uniform", in_config=False),
    EvalMethod(EXPERTS, "expert", "Expert", lm_eval={"method": "expert"}, aliases=("expert",)),
    EvalMethod("ensemble_uniform", "ensemble", "Ensemble uniform", mixing_rule="uniform",
               lm_eval={"method": "uniform"}),
    EvalMethod("ensemble_prior", "ensemble", "Ensemble prior", needs_prior=True, mixing_rule="prior",
               lm_eval={"method": "prior"}),
    EvalMethod("ensemble_posterior", "ensemble", "Ensemble posterior", needs_prior=True,
               mixing_rule="posterior", lm_eval={"method": "posterior"}),
    EvalMethod("ensemble_prev_token", "ensemble", "Ensemble prev-token", needs_prior=True,
               mixing_rule="prev_token"),
    EvalMethod("topk_prior", "topk", "Top-k prior", needs_prior=True, mixing_rule="prior",
               lm_eval={"method": "prior", "top_k": GIVEN}),
    EvalMethod("average_uniform", "average", "Avg uniform", lm_eval={"method": "average"}),
    EvalMethod("average_argmax", "average", "Avg argmax", needs_prior=True),
    EvalMethod("average_posterior", "average", "Avg posterior", needs_prior=True,
               lm_eval={"method": "average", "prior": GIVEN}),
    *(EvalMethod(f"merge_{method}_{weighting}", "merge", f"{label} {weighting}",
                 needs_prior=weighting == "posterior")
      for method, label in MERGE_LABELS.items() for weighting in MERGE_WEIGHTINGS),
    EvalMethod("cbtm_cluster", "cluster", "c-BTM", lm_eval={"method": "cluster"}),
    # The forest as one Mixture-of-Experts model (stage moe; scored when moe.enabled). lm-eval
    # runs it as one model: checkpoint=RUN/moe/checkpoint_last.pt.
    EvalMethod("moe", "moe", "MoE (BTX)", in_config=False),
)
REGISTRY: dict[str, EvalMethod] = {m.name: m for m in METHODS}
_ALIASES: dict[str, str] = {a: m.name for m in METHODS for a in m.aliases}

# The names a config's evaluation.methods accepts, and the baselines it lists apart.
CONFIG_METHODS: tuple[str, ...] = tuple(m.name for m in METHODS if m.in_config)
BASELINES: tuple[str, ...] = tuple(m.name for m in METHODS if m.kind == "baseline")
# The `method` values of results rows other than expert:<name>, in table order.
RESULT_METHODS: tuple[str, ...] = tuple(m.name for m in METHODS if m.name != EXPERTS)
# The methods computed by mixing the forest's cached per-token scores (what `btm eval` takes),
# and those of them that need no cluster model (`btm eval`'s default).
MIXES: tuple[str, ...] = tuple(m.name for m in METHODS if m.kind in ("expert", "ensemble", "topk", "cluster"))
FOREST_MIXES: tuple[str, ...] = tuple(m.name for m in METHODS if m.kind in ("expert", "ensemble", "topk"))
# The values of the lm-eval model argument ``method`` (fairseq_ext/lm_eval_btm.py), in registry order.
LM_EVAL_METHODS: tuple[str, ...] = tuple(dict.fromkeys(m.lm_eval["method"] for m in METHODS
                                                       if m.lm_eval and "method" in m.lm_eval))


def merge_method_name(method: str, weighting: str) -> str:
    """The registered name of merge ``method`` with ``weighting`` (``merge_ties_posterior``);
    ``linear`` is the ``average_<weighting>`` method. BtmError for a pair not registered."""
    name = f"average_{weighting}" if method == "linear" else f"merge_{method}_{weighting}"
    if name not in REGISTRY or REGISTRY[name].kind not in ("average", "merge"):
        raise BtmError(f"merge method {method!r} with {weighting!r} weights is not an evaluation "
                       f"method (merge methods: linear, {', '.join(MERGE_LABELS)}; weights: "
                       f"{', '.join(MERGE_WEIGHTINGS)}, and argmax for linear)")
    return name


def merge_parts(name: str) -> tuple[str, str]:
    """(merge method, weighting) of a registered ``average_*`` or ``merge_*`` method:
    ``average_posterior`` -> (linear, posterior), ``merge_dare_ties_uniform`` -> (dare_ties, uniform)."""
    kind = get_method(name).kind
    if kind == "average":
        return "linear", name.split("_", 1)[1]
    if kind != "merge":
        raise BtmError(f"{name!r} is not a parameter average or merge")
    method, weighting = name[len("merge_"):].rsplit("_", 1)
    return method, weighting


def is_expert_method(name: str) -> bool:
    return isinstance(name, str) and name.startswith(EXPERT_PREFIX)


def is_result_method(name: str) -> bool:
    """Whether ``name`` may stand in the ``method`` column of the results table."""
    return name in RESULT_METHODS or bool(_EXPERT_METHOD.fullmatch(str(name)))


def get_method(name: str, what: str = "evaluation method") -> EvalMethod:
    """The registered method ``name`` (``expert:<x>`` gives the ``experts`` entry), else a
    BtmError with a did-you-mean."""
    if is_expert_method(name):
        return REGISTRY[EXPERTS]
    if name in REGISTRY:
        return REGISTRY[name]
    if name in _ALIASES:
        return REGISTRY[_ALIASES[name]]
    close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise BtmError(f"unknown {what} {name!r}{hint} (known: {', '.join(REGISTRY)})")


def canonical(name: str) -> str:
    """The registered name of ``name`` (an alias resolved; ``expert:<x>`` as is)."""
    return name if is_expert_method(name) else get_method(name).name


def label(name: str) -> str:
    """A method's name in report tables (an unregistered name stands for itself)."""
    return REGISTRY[name].label if name in REGISTRY else name


def from_lm_eval(model_args: dict) -> str:
    """The registered method that btm lm-eval model arguments run: the one whose ``lm_eval``
    arguments all match, the most specific if several do (``method`` defaults to posterior)."""
    args = {"method": "posterior", **{k: v for k, v in model_args.items() if v is not None}}

    def matches(wanted: dict) -> bool:
        return all(key in args and (value == GIVEN or args[key] == value) for key, value in wanted.items())

    found = [m for m in METHODS if m.lm_eval and matches(m.lm_eval)]
    if not found:
        raise BtmError(f"unknown btm method {args['method']!r} (known: {', '.join(LM_EVAL_METHODS)})")
    return max(found, key=lambda m: len(m.lm_eval)).name


def of_kind(kind: str, names) -> list[str]:
    """The names among ``names`` whose method is of ``kind``, in the order given."""
    return [n for n in names if get_method(n).kind == kind]


def needs_prior(names) -> bool:
    return any(get_method(n).needs_prior for n in names)


def table_order(name: str) -> int:
    """Rank of a method in report tables: registry order, one-expert rows last."""
    if is_expert_method(name):
        return len(METHODS) + 1
    return [m.name for m in METHODS].index(name) if name in REGISTRY else len(METHODS)
