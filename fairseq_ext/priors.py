"""Domain priors over a forest's experts: estimated on held-out data, cached as JSON.

The prior P(D=j) of an eval domain comes from one of two estimators (``PriorSettings.estimator``):
- ``document`` (the default), ``ensemble.estimate_prior``: the EWMA (alpha 0.3) of batch
  posteriors over held-out documents, where a batch's posterior is the mean over its documents
  of P(D=j | document) = softmax_j(total log-likelihood of the document under expert j);
- ``block_end``, ``ensemble.estimate_prior_block_end``: DEMix's released estimator, the same
  EWMA over batches of blocks of the previous-token posterior at each block's end.
It is then tempered, ``prior ** (1/T)`` renormalized, with T the one of ``temperatures`` whose
fixed-prior ensemble has the lowest nll on the held-out split (one value: that T; the default
candidates, ``launcher.contract.methods.PRIOR_TEMPERATURES``, won on btm-forest's valid split).
It is computed from cached scores (``fairseq_ext/scoring.py``), so it costs no forward pass
once the held-out split has been scored, and is saved as ``RUN/priors/<domain>.<key>.json``
with every setting it depends on, the chosen temperature and the nll of each candidate.
The document posterior also picks the parents of a new expert (``branch_weights``, used by
``btm branch --posterior``).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from launcher.contract.atomic import atomic_write_json, sha256_bytes
from launcher.contract.errors import BtmError
from launcher.contract.methods import PRIOR_TEMPERATURES
from launcher.contract.names import validate_name
from fairseq_ext.ensemble import choose_temperature, estimate_prior, estimate_prior_block_end, temper_prior

PRIOR_FORMAT = 1
ESTIMATORS = ("document", "block_end")


@dataclass(frozen=True)
class PriorSettings:
    split: str = field(default="valid", metadata={"help": "held-out split the prior is estimated on"})
    alpha: float = field(default=0.3, metadata={"help": "EWMA weight of each new batch posterior"})
    n_batches: int | None = field(default=None, metadata={
        "help": "batches of held-out documents to use (None: all of the split)"})
    batch_docs: int = field(default=2, metadata={"help": "documents (document) or blocks (block_end) per batch"})
    estimator: str = field(default="document", metadata={
        "help": "document: whole-document Bayes posterior; block_end: DEMix's previous-token "
                "posterior at the end of each block"})
    block_tokens: int = field(default=1024, metadata={
        "help": "tokens per block of the block_end estimator (DEMix: 1024, its context length)"})
    temperatures: tuple[float, ...] = field(default=PRIOR_TEMPERATURES, metadata={
        "help": "candidate temperatures T (prior ** 1/T); several: the one with the lowest "
                "held-out nll of the fixed-prior ensemble (default: 1, 3, 10, 30, 100)"})

    def validate(self) -> "PriorSettings":
        if self.estimator not in ESTIMATORS:
            raise BtmError(f"unknown prior estimator {self.estimator!r}; known: {', '.join(ESTIMATORS)}")
        if self.block_tokens < 1:
            raise BtmError(f"prior block_tokens must be at least 1, got {self.block_tokens}")
        if not self.temperatures:
            raise BtmError("prior temperatures must list at least one value")
        for t in self.temperatures:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (np.isfinite(t) and t > 0):
                raise BtmError(f"prior temperatures must be positive finite numbers, got {t!r}")
        return self

    def describe(self, temperature: float | None = None) -> str:
        """The ``prior`` column of the results table (``temperature``: the one used; None: the
        only candidate, or with several, the candidates)."""
        batches = "all" if self.n_batches is None else self.n_batches
        if self.estimator == "block_end":
            label = (f"block_end(alpha={self.alpha:g},batches={batches},batch_blocks={self.batch_docs},"
                     f"block_tokens={self.block_tokens},split={self.split})")
        else:
            label = f"ewma(alpha={self.alpha:g},batches={batches},batch_docs={self.batch_docs},split={self.split})"
        if len(self.temperatures) > 1:
            if temperature is None:
                return f"{label},T=best_of({'/'.join(f'{t:g}' for t in self.temperatures)})"
            return f"{label},T={temperature:g}(chosen)"
        temperature = self.temperatures[0] if temperature is None else temperature
        return label if temperature == 1.0 else f"{label},T={temperature:g}"


def stack_scores(scores: list) -> tuple[np.ndarray, np.ndarray]:
    """[N, T] log-probs and doc_starts from per-expert ``Scores`` of one split."""
    first = scores[0]
    for s in scores[1:]:
        if s.tokens != first.tokens or not np.array_equal(s.doc_starts, first.doc_starts):
            raise BtmError(f"scores {s.path} and {first.path} cover different tokens; "
                           "were they scored with different data or context settings?")
    return np.stack([s.logprobs for s in scores]), first.doc_starts


def prior_key(domain: str, experts: dict[str, str], score_keys: list[dict], settings: PriorSettings) -> dict:
    """What a cached prior depends on: expert names in order, their score keys, the settings."""
    key = {"format": PRIOR_FORMAT, "domain": domain, "experts": list(experts),
           "scores": score_keys, "settings": asdict(settings)}
    return json.loads(json.dumps(key))  # as it reads back (tuples are lists), so it compares equal


def prior_path(priors_dir: str | os.PathLike, key: dict) -> Path:
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode())[:16]
    return Path(priors_dir) / f"{key['domain']}.{digest}.json"


class CachedPrior(NamedTuple):
    prior: np.ndarray  # [N], tempered, summing to 1
    path: Path  # its JSON file
    cached: bool  # read from the cache (not estimated now)
    temperature: float  # the temperature it was tempered with


def load_prior(path: Path, key: dict) -> tuple[np.ndarray, float] | None:
    """(prior, temperature) cached at ``path`` if it was computed for exactly ``key``."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        prior = np.asarray(data["prior"], dtype=np.float64)
        if prior.shape != (len(key["experts"]),):
            raise ValueError(f"{prior.shape[0] if prior.ndim else 0} weights for {len(key['experts'])} experts")
        return prior, float(data.get("temperature", 1.0))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # Derived from cached scores in no time: recompute and overwrite it, saying so.
        print(f"btm: warning: cached prior {path} cannot be read ({e}); estimating it again", file=sys.stderr)
        return None


def save_prior(path: Path, key: dict, prior: np.ndarray, *, untempered: np.ndarray | None = None,
               temperature: float = 1.0, heldout_nll: dict | None = None) -> None:
    """The prior file: its key (estimator and temperatures included), the prior, and how the
    temperature was chosen (the held-out nll of each candidate)."""
    untempered = prior if untempered is None else untempered
    atomic_write_json(path, {"key": key, "prior": [float(p) for p in prior],
                             "by_expert": dict(zip(key["experts"], map(float, prior))),
                             "estimator": key["settings"]["estimator"], "temperature": float(temperature),
                             "untempered_prior": [float(p) for p in untempered],
                             "heldout_nll_by_temperature": {f"{t:g}": v for t, v in (heldout_nll or {}).items()}})


def untempered_prior(lp: np.ndarray, starts: np.ndarray, settings: PriorSettings) -> np.ndarray:
    """The untempered prior of ``settings.estimator`` from held-out scores [N, T]."""
    if settings.estimator == "block_end":
        return estimate_prior_block_end(lp, settings.block_tokens, n_batches=settings.n_batches,
                                        alpha=settings.alpha, batch_blocks=settings.batch_docs)
    return estimate_prior(lp, starts, n_batches=settings.n_batches, alpha=settings.alpha,
                          batch_docs=settings.batch_docs)


def tempered_prior(lp: np.ndarray, starts: np.ndarray, settings: PriorSettings):
    """(prior, untempered prior, temperature, {candidate: held-out nll}) from held-out scores
    [N, T]: ``settings.estimator``'s estimate, tempered with the one candidate temperature, or
    with the one of several whose fixed-prior ensemble has the lowest nll on these scores."""
    untempered = untempered_prior(lp, starts, settings)
    if len(settings.temperatures) > 1:
        temperature, heldout_nll = choose_temperature(lp, starts, untempered, settings.temperatures)
    else:
        temperature, heldout_nll = float(settings.temperatures[0]), {}
    return temper_prior(untempered, temperature), untempered, temperature, heldout_nll


def cached_domain_prior(priors_dir: str | os.PathLike, domain: str, experts: dict[str, str],
                        heldout_scores: list, settings: PriorSettings) -> CachedPrior:
    """The (tempered) prior of ``domain`` from the cache, or estimated and cached."""
    settings = settings.validate()
    key = prior_key(domain, experts, [s.key for s in heldout_scores], settings)
    path = prior_path(priors_dir, key)
    hit = load_prior(path, key)
    if hit is not None:
        return CachedPrior(hit[0], path, True, hit[1])
    lp, starts = stack_scores(heldout_scores)
    prior, untempered, temperature, heldout_nll = tempered_prior(lp, starts, settings)
    save_prior(path, key, prior, untempered=untempered, temperature=temperature, heldout_nll=heldout_nll)
    return CachedPrior(prior, path, False, temperature)


def top_k_weights(weights: dict, top_k: int | None) -> dict:
    """Keep the ``top_k`` largest weights (ties: earlier entry) and renormalize to sum 1."""
    names = list(weights)
    w = np.asarray([weights[n] for n in names], dtype=np.float64)
    if top_k is not None:
        if top_k < 1:
            raise BtmError(f"top_k must be at least 1, got {top_k}")
        keep = np.zeros_like(w, dtype=bool)
        keep[np.argsort(-w, kind="stable")[:top_k]] = True
        w = np.where(keep, w, 0.0)
    w = w / w.sum()
    return {n: float(x) for n, x in zip(names, w) if x > 0}


def branch_weights(expert_checkpoints, data_dir: str | os.PathLike, domain: str, split: str = "valid",
                   sample_docs: int | None = 100, top_k: int | None = None, *,
                   cache_dir: str | os.PathLike | None = None, context=None, device: str = "cpu",
                   batch_size: int = 8, alpha: float = 0.3, batch_docs: int = 2) -> dict:
    """Parent weights for a new expert on ``domain``: the domain posterior of the existing
    experts on the first ``sample_docs`` documents of ``DATA/<domain>/<split>`` (estimated
    like the cached prior), top-k renormalized.

    ``expert_checkpoints``: {name: checkpoint path} (a list of paths is keyed by path).
    Returns {name: weight} with only the kept experts, weights summing to 1.
    ``cache_dir``: where the scores are cached (None: a temporary directory).
    """
    from fairseq_ext.scoring import ContextSettings, score_split

    if not isinstance(expert_checkpoints, dict):
        expert_checkpoints = {str(p): p for p in expert_checkpoints}
    if not expert_checkpoints:
        raise BtmError("branch_weights needs at least one existing expert")
    validate_name(domain, "domain")
    if sample_docs is not None and sample_docs < 1:
        raise BtmError(f"sample_docs must be at least 1, got {sample_docs}")
    ctx = context or ContextSettings()
    ctx = ContextSettings(**{**asdict(ctx), "max_docs": sample_docs})

    def run(directory) -> list:
        return [score_split(path, data_dir, domain, split, cache_dir=directory, context=ctx,
                            device=device, batch_size=batch_size)
                for path in expert_checkpoints.values()]

    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="btm-branch-scores-") as tmp:
            scores = run(tmp)
    else:
        scores = run(cache_dir)
    lp, starts = stack_scores(scores)
    posterior = estimate_prior(lp, starts, alpha=alpha, batch_docs=batch_docs)
    return top_k_weights(dict(zip(expert_checkpoints, posterior)), top_k)
