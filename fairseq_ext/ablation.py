"""Expert removal (BTM's data opt-out finding, F8) from cached scores: no training, no scoring.

For every expert j of a forest and every eval domain: drop j, re-estimate the domain prior over
the remaining experts on the held-out split (the same estimator and temperature rule as the
full forest, ``fairseq_ext/priors.py``), re-mix the remaining experts' cached scores with the
chosen ensemble rule, and compare with the full forest mixed the same way. The relative
perplexity change ``ppl_without / ppl_full - 1`` is the cost of removing j on that domain:
the paper expects it large on j's own domain and near 0 elsewhere.

Every score must already be in the cache (``btm run`` scores them, or ``btm eval``); a missing
one is an error naming the expert, domain and split, so an audit never starts a forward pass.
The priors are re-estimated in memory: the cache ``RUN/priors`` keeps only the forest's own.
Returns rows; the launcher writes the table (``btm forest ablate``).
"""
from __future__ import annotations

import math
from pathlib import Path

from launcher.contract import methods as registry
from launcher.contract.ablation import ABLATION_COLUMNS  # noqa: F401  (the rows' columns)
from launcher.contract.errors import BtmError
from launcher.contract.names import validate_name
from fairseq_ext import ensemble
from fairseq_ext.evaluate import EvalDirs, EvalSettings, Scorer
from fairseq_ext.priors import PriorSettings, stack_scores, tempered_prior


def ensemble_rule(method: str) -> str:
    """The mixing rule of a registered ensemble method (``ensemble_posterior`` -> ``posterior``)."""
    m = registry.get_method(method)
    if m.kind != "ensemble":
        raise BtmError(f"expert removal mixes with an ensemble method; {method!r} is a {m.kind} method "
                       f"(known: {', '.join(registry.of_kind('ensemble', registry.REGISTRY))})")
    return m.mixing_rule


def _require_cached(scorer: Scorer, experts: dict[str, Path], domains: list[str], splits: list[str]) -> None:
    for name, path in experts.items():
        if not Path(path).is_file():
            raise BtmError(f"expert {name!r}: checkpoint {path} does not exist")
        for domain in domains:
            for split in splits:
                if not scorer.is_cached(Path(path), domain, split):
                    raise BtmError(f"no cached scores of expert {name!r} on {domain}/{split} in "
                                   f"{scorer.cache_dir}; expert removal only re-mixes cached scores: "
                                   "run `btm run` (its score stage) or `btm eval` with the same settings first")


def _mixture_nll(keep: list[int], held, scored, rule: str, settings: PriorSettings) -> tuple[float, float]:
    """(nll of the experts ``keep`` mixed by ``rule``, the prior's temperature; 1 for uniform)."""
    lp, starts = scored
    prior, temperature = None, 1.0
    if rule != "uniform":
        held_lp, held_starts = held
        prior, _, temperature, _ = tempered_prior(held_lp[keep], held_starts, settings)
    return ensemble.nll(ensemble.ensemble_logprobs(lp[keep], starts, rule, prior)), temperature


def ablate_experts(experts: dict[str, Path], eval_domains: list[str], dirs: EvalDirs, *,
                   settings: EvalSettings = EvalSettings(), method: str = "ensemble_posterior") -> list[dict]:
    """One row per (removed expert, eval domain) with the columns ``ABLATION_COLUMNS``
    (launcher/contract/ablation.py)."""
    settings = settings.validate()
    rule = ensemble_rule(method)
    if len(experts) < 2:
        raise BtmError(f"expert removal needs a forest of at least 2 experts, got {len(experts)}")
    for d in eval_domains:
        validate_name(d, "eval domain")
    names = list(experts)
    scorer = Scorer(dirs, settings)
    splits = list(dict.fromkeys([*([settings.prior.split] if rule != "uniform" else []), settings.split]))
    _require_cached(scorer, experts, eval_domains, splits)
    prior_label = "none" if rule == "uniform" else settings.prior.describe()
    rows = []
    for domain in eval_domains:
        def stacked(split):
            return stack_scores([scorer(Path(experts[n]), domain, split) for n in names])

        scored = stacked(settings.split)
        held = stacked(settings.prior.split) if rule != "uniform" else None
        full, t_full = _mixture_nll(list(range(len(names))), held, scored, rule, settings.prior)
        for j, removed in enumerate(names):
            keep = [i for i in range(len(names)) if i != j]
            without, t_without = _mixture_nll(keep, held, scored, rule, settings.prior)
            rows.append({"removed": removed, "eval_domain": domain, "split": settings.split,
                         "method": registry.canonical(method), "prior": prior_label,
                         "temperature_full": t_full, "temperature_without": t_without,
                         "experts_left": len(keep), "nll_full": full, "nll_without": without,
                         "ppl_full": math.exp(full), "ppl_without": math.exp(without),
                         "rel_ppl_change": math.expm1(without - full)})
    return rows
