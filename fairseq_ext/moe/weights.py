"""The averaging weights of a MoE's shared parameters (embeddings, attention, norms): uniform,
or posterior -- the mean over the MoE's training domains of each domain's cached prior over the
experts (the same prior the ensembles and posterior averages use, fairseq_ext/priors.py), since
one MoE serves the whole balanced mix rather than one target domain."""
from __future__ import annotations

from pathlib import Path

from launcher.contract.errors import BtmError

WEIGHT_RULES = ("uniform", "posterior")


def moe_weights(rule: str, experts: dict[str, Path], domains: list[str], dirs, settings) -> list[float]:
    """One weight per expert (sum 1). ``dirs``/``settings``: fairseq_ext.evaluate's EvalDirs and
    EvalSettings (scores and priors are cached there; posterior only)."""
    import numpy as np

    n = len(experts)
    if rule == "uniform":
        return [1.0 / n] * n
    if rule != "posterior":
        raise BtmError(f"moe weights {rule!r}: use one of {', '.join(WEIGHT_RULES)}")
    if not domains:
        raise BtmError("moe weights posterior needs the training domains whose priors it averages")
    from fairseq_ext.evaluate import Scorer, domain_prior

    scorer = Scorer(dirs, settings.validate())
    priors = [domain_prior(dirs, scorer, experts, d, settings.prior).prior for d in domains]
    mean = np.mean(np.asarray(priors, dtype=np.float64), axis=0)
    return [float(w) for w in mean / mean.sum()]
