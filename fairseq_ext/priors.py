"""Domain priors over a forest's experts: estimated on held-out data, cached as JSON.

The prior P(D=j) of an eval domain is ``ensemble.estimate_prior``: the EWMA (alpha 0.3) of batch
posteriors over held-out documents, where a batch's posterior is the mean over its documents of
P(D=j | document) = softmax_j(total log-likelihood of the document under expert j). It is
computed from cached scores (``fairseq_ext/scoring.py``), so it costs no forward pass once the
held-out split has been scored, and is saved as ``RUN/priors/<domain>.<key>.json`` with every
setting it depends on. The same posterior picks the parents of a new expert
(``branch_weights``, used by ``btm branch --posterior``).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from launcher.contract.atomic import atomic_write_json, sha256_bytes
from launcher.contract.errors import BtmError
from launcher.contract.names import validate_name
from fairseq_ext.ensemble import estimate_prior  # noqa: F401  (re-exported: the one definition)

PRIOR_FORMAT = 1


@dataclass(frozen=True)
class PriorSettings:
    split: str = field(default="valid", metadata={"help": "held-out split the prior is estimated on"})
    alpha: float = field(default=0.3, metadata={"help": "EWMA weight of each new batch posterior"})
    n_batches: int | None = field(default=None, metadata={
        "help": "batches of held-out documents to use (None: all of the split)"})
    batch_docs: int = field(default=2, metadata={"help": "documents per batch"})

    def describe(self) -> str:
        """The ``prior`` column of the results table."""
        batches = "all" if self.n_batches is None else self.n_batches
        return f"ewma(alpha={self.alpha:g},batches={batches},batch_docs={self.batch_docs},split={self.split})"


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
    return {"format": PRIOR_FORMAT, "domain": domain, "experts": list(experts),
            "scores": score_keys, "settings": asdict(settings)}


def prior_path(priors_dir: str | os.PathLike, key: dict) -> Path:
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode())[:16]
    return Path(priors_dir) / f"{key['domain']}.{digest}.json"


def load_prior(path: Path, key: dict) -> np.ndarray | None:
    """The cached prior at ``path`` if it was computed for exactly ``key``."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        prior = np.asarray(data["prior"], dtype=np.float64)
        if prior.shape != (len(key["experts"]),):
            raise ValueError(f"{prior.shape[0] if prior.ndim else 0} weights for {len(key['experts'])} experts")
        return prior
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # Derived from cached scores in no time: recompute and overwrite it, saying so.
        print(f"btm: warning: cached prior {path} cannot be read ({e}); estimating it again", file=sys.stderr)
        return None


def save_prior(path: Path, key: dict, prior: np.ndarray) -> None:
    atomic_write_json(path, {"key": key, "prior": [float(p) for p in prior],
                             "by_expert": dict(zip(key["experts"], map(float, prior)))})


def cached_domain_prior(priors_dir: str | os.PathLike, domain: str, experts: dict[str, str],
                        heldout_scores: list, settings: PriorSettings) -> tuple[np.ndarray, Path, bool]:
    """(prior [N], its JSON path, whether it came from the cache) for ``domain``."""
    key = prior_key(domain, experts, [s.key for s in heldout_scores], settings)
    path = prior_path(priors_dir, key)
    prior = load_prior(path, key)
    if prior is not None:
        return prior, path, True
    lp, starts = stack_scores(heldout_scores)
    prior = estimate_prior(lp, starts, n_batches=settings.n_batches, alpha=settings.alpha,
                           batch_docs=settings.batch_docs)
    save_prior(path, key, prior)
    return prior, path, False


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
