"""Mixing the per-token scores of a forest's experts (numpy only; no fairseq, no torch).

Every function here works on ``expert_logprobs``: an ``[N, T]`` array with the natural-log
probability each of N experts gave each of T target tokens, tokens in document order, and
``doc_starts``: the offsets where documents begin (``doc_starts[0] == 0``). Scoring is done
once (``fairseq_ext/scoring.py``); any mixing rule, prior or top-k is then O(N*T) numpy.

The ensemble (Li et al., 2022, after DEMix):

    p(x_t | x_<t) = sum_j p_j(x_t | x_<t) * P(D=j | x_<t)

with the domain posterior ``P(D=j | x_<t)`` given by Bayes' rule,

    P(D=j | x_<t)  ∝  P(D=j) * prod_{s<t, s in the current document} p_j(x_s | x_<s),

reset to the prior ``P(D=j)`` at every document boundary. Everything is computed in log space
with float64 accumulation (a long document's prefix likelihood underflows any float).

Methods (``ensemble_logprobs(method=...)``):
- ``uniform``: weights 1/N everywhere (the prior is ignored).
- ``prior``: the fixed (cached) prior at every position.
- ``posterior``: the updating Bayesian posterior above (full prefix inside the document).
- ``prev_token``: the DEMix reference implementation's rule: the "posterior" uses only the
  previous token's likelihood, ``w_j(t) ∝ prior_j * p_j(x_{t-1})``; the first token of a
  document gets the prior. (The reference gives the first token of a block uniform weights
  when a prior is supplied; we use the prior, which is the same thing for a uniform prior.)
``top_k`` keeps, at each position, the k experts with the highest weight under the chosen
method (ties go to the lower expert index) and renormalizes. For ``prior`` the selection is
the same at every position, so only those k experts need scoring (see ``topk_experts``).

Prompt routing (c-BTM's few-shot rule, used by ``fairseq_ext/lm_eval_btm.py``): weights fixed
from a whole prompt (``prompt_log_weights``: the posterior given the prompt), an answer scored
as the mixture of whole sequences (``sequence_log_weights`` gives its per-token form).
"""
from __future__ import annotations

import numpy as np

from launcher.contract.errors import BtmError

METHODS = ("uniform", "prior", "posterior", "prev_token")


# ----------------------------------------------------------------------------- validation

def check_inputs(expert_logprobs, doc_starts) -> tuple[np.ndarray, np.ndarray]:
    """Return (float64 [N, T] log-probs, int64 doc_starts) or raise BtmError naming the fault."""
    lp = np.asarray(expert_logprobs)
    if lp.ndim != 2 or lp.shape[0] < 1 or lp.shape[1] < 1:
        raise BtmError(f"expert_logprobs must be a non-empty [N experts, T tokens] array, got shape {lp.shape}")
    lp = lp.astype(np.float64, copy=False)
    if not np.all(np.isfinite(lp)):
        bad = np.argwhere(~np.isfinite(lp))[0]
        raise BtmError(f"expert_logprobs has a non-finite value at expert {bad[0]}, token {bad[1]}")
    if np.any(lp > 1e-6):
        bad = np.argwhere(lp > 1e-6)[0]
        raise BtmError(f"expert_logprobs must be log-probabilities (<= 0); expert {bad[0]}, "
                       f"token {bad[1]} has {lp[bad[0], bad[1]]}")
    starts = np.asarray(doc_starts)
    if starts.ndim != 1 or starts.size == 0 or not np.issubdtype(starts.dtype, np.integer):
        raise BtmError(f"doc_starts must be a non-empty 1-d integer array, got {starts.dtype} {starts.shape}")
    starts = starts.astype(np.int64, copy=False)
    if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= lp.shape[1]:
        raise BtmError(f"doc_starts must start at 0 and increase strictly below T={lp.shape[1]}; "
                       f"got {starts[:5].tolist()}{'...' if starts.size > 5 else ''}")
    return lp, starts


def normalize_prior(prior, n_experts: int) -> np.ndarray:
    """A prior as float64 probabilities summing to 1 (None means uniform)."""
    if prior is None:
        return np.full(n_experts, 1.0 / n_experts)
    p = np.asarray(prior, dtype=np.float64).reshape(-1)
    if p.size != n_experts:
        raise BtmError(f"prior has {p.size} entries but there are {n_experts} experts")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or not np.any(p > 0):
        raise BtmError(f"prior must be finite and non-negative with a positive sum, got {p.tolist()[:8]}")
    # Scale by the largest entry first: p.sum() overflows to inf for entries near the float
    # maximum (e.g. [1e308]*3), and p / inf is all zeros. After scaling every entry is in
    # [0, 1], so the sum is in [1, N] and the division is exact to rounding.
    scaled = p / p.max()
    return scaled / scaled.sum()


def _log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def logsumexp(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """log(sum(exp(a))) along ``axis``; rows that are all -inf give -inf."""
    m = np.max(a, axis=axis, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m_safe), axis=axis, keepdims=True)) + m_safe
    return np.squeeze(out, axis=axis)


def doc_index(doc_starts: np.ndarray, n_tokens: int) -> np.ndarray:
    """For every token, the index of the document it belongs to."""
    return np.searchsorted(doc_starts, np.arange(n_tokens), side="right") - 1


# ----------------------------------------------------------------------------- weights

def prefix_loglik(lp: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
    """[N, T] sum of log p_j(x_s) over s < t in t's document (0 at a document's first token).

    Summed per document, from that document's first token: a running sum over the whole split
    minus its value at the document start would carry the rounding error of every earlier
    document (a split's sum reaches ~1e7 nats, where a float64 keeps only ~1e-9 absolute).
    """
    out = np.zeros_like(lp)
    ends = np.append(doc_starts[1:], lp.shape[1])
    for start, end in zip(doc_starts.tolist(), ends.tolist()):
        np.cumsum(lp[:, start:end - 1], axis=1, out=out[:, start + 1:end])
    return out


def log_weights(expert_logprobs, doc_starts, method: str = "posterior", prior=None) -> np.ndarray:
    """[N, T] normalized log mixture weights log P(D=j | x_<t) for ``method``."""
    lp, starts = check_inputs(expert_logprobs, doc_starts)
    n, t = lp.shape
    if method not in METHODS:
        raise BtmError(f"unknown mixing method {method!r}; known: {', '.join(METHODS)}")
    if method == "uniform":
        return np.full((n, t), -np.log(n))
    log_prior = _log(normalize_prior(prior, n))[:, None]
    if method == "prior":
        return np.broadcast_to(log_prior, (n, t)).copy()
    if method == "posterior":
        unnorm = log_prior + prefix_loglik(lp, starts)
    else:  # prev_token
        prev = np.zeros_like(lp)
        prev[:, 1:] = lp[:, :-1]
        prev[:, starts] = 0.0  # a document's first token sees only the prior
        unnorm = log_prior + prev
    return unnorm - logsumexp(unnorm, axis=0)[None, :]


def keep_top_k(log_w: np.ndarray, k: int | None) -> np.ndarray:
    """Keep the k largest weights at every position (ties: lower index), renormalized."""
    n = log_w.shape[0]
    if k is None or k >= n:
        return log_w
    if k < 1:
        raise BtmError(f"top_k must be at least 1, got {k}")
    # A stable sort on -weight puts equal weights in index order, so ties go to lower indices.
    order = np.argsort(-log_w, axis=0, kind="stable")[:k]
    kept = np.full_like(log_w, -np.inf)
    np.put_along_axis(kept, order, np.take_along_axis(log_w, order, axis=0), axis=0)
    return kept - logsumexp(kept, axis=0)[None, :]


def topk_experts(prior, k: int) -> list[int]:
    """Indices of the k experts with the highest prior (ties: lower index): the only experts
    that ``method='prior', top_k=k`` needs scores from."""
    p = np.asarray(prior, dtype=np.float64).reshape(-1)
    if not 1 <= k:
        raise BtmError(f"top_k must be at least 1, got {k}")
    return sorted(np.argsort(-p, kind="stable")[:k].tolist())


# ----------------------------------------------------------------------------- mixtures

def mix_log_weights(expert_logprobs, log_w: np.ndarray) -> np.ndarray:
    """[T] float64 mixture log-probs: logsumexp_j(log w_j(t) + log p_j(x_t))."""
    lp = np.asarray(expert_logprobs, dtype=np.float64)
    return logsumexp(log_w + lp, axis=0)


def ensemble_logprobs(expert_logprobs, doc_starts, method: str = "posterior", prior=None,
                      top_k: int | None = None) -> np.ndarray:
    """Per-token log-probs [T] (float64) of the forest's ensemble under ``method``.

    ``prior``: [N] (None = uniform); ``top_k``: keep only the k highest-weight experts per
    position (None or >= N = all). ``-mean`` of the result is the ensemble's nll.
    """
    log_w = keep_top_k(log_weights(expert_logprobs, doc_starts, method, prior), top_k)
    return mix_log_weights(expert_logprobs, log_w)


def mix_with_weights(expert_logprobs, weights) -> np.ndarray:
    """Mix with externally given weights: [N] (same at every token) or [T, N] (per token,
    e.g. c-BTM cluster routing). Rows are renormalized to sum to 1. Returns [T] log-probs."""
    lp = np.asarray(expert_logprobs, dtype=np.float64)
    if lp.ndim != 2:
        raise BtmError(f"expert_logprobs must be [N, T], got shape {lp.shape}")
    n, t = lp.shape
    w = np.asarray(weights, dtype=np.float64)
    if w.shape == (n,):
        w = w[None, :]
    elif w.shape != (t, n):
        raise BtmError(f"weights must have shape [{n}] or [{t}, {n}] (tokens, experts), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise BtmError("weights must be finite and non-negative")
    sums = w.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise BtmError(f"weights row {int(np.argmin(sums[:, 0]))} sums to 0")
    log_w = _log(w / sums).T  # [N, T] or [N, 1]
    return mix_log_weights(lp, np.broadcast_to(log_w, (n, t)))


# ----------------------------------------------------------------------------- prompt routing
# c-BTM's few-shot rule: weights come from the whole prompt and stay fixed; an answer option is
# scored by the mixture of whole sequences, logsumexp_j(log w_j + log p_j(option | prompt)).

def prompt_log_weights(prompt_loglik, prior=None, top_k: int | None = None) -> np.ndarray:
    """[N, R] log posteriors P(D=j | prompt_r) ∝ P(D=j) * p_j(prompt_r) from each prompt's total
    log-likelihood under each expert ([N, R]; a prompt with no tokens has 0: the prior), the
    k largest kept (ties: lower index), the others -inf."""
    ll = np.asarray(prompt_loglik, dtype=np.float64)
    if ll.ndim != 2 or not np.all(np.isfinite(ll)):
        raise BtmError(f"prompt_loglik must be a finite [N experts, R prompts] array, got shape {ll.shape}")
    unnorm = _log(normalize_prior(prior, ll.shape[0]))[:, None] + ll
    return keep_top_k(unnorm - logsumexp(unnorm, axis=0)[None, :], top_k)


def sequence_log_weights(log_w0, expert_logprobs) -> np.ndarray:
    """[N, T] per-token log weights of the mixture of whole sequences ``sum_j w0_j prod_t
    p_j(x_t)``: Bayes' rule from ``w0`` on the tokens before t. So ``mix_log_weights(lp,
    result).sum() == logsumexp_j(log w0_j + sum_t log p_j(x_t))``, and ``result[:, t]`` gives
    the sequence mixture's next-token distribution at t."""
    lp = np.asarray(expert_logprobs, dtype=np.float64)
    unnorm = np.asarray(log_w0, dtype=np.float64)[:, None] + prefix_loglik(lp, np.array([0]))
    return unnorm - logsumexp(unnorm, axis=0)[None, :]


def nll(mixture_logprobs) -> float:
    """Mean natural-log loss per token."""
    return float(-np.mean(np.asarray(mixture_logprobs, dtype=np.float64)))


# ----------------------------------------------------------------------------- priors

def document_posteriors(expert_logprobs, doc_starts, prior=None) -> np.ndarray:
    """[D, N] posterior P(D=j | whole document) for each document: softmax over experts of
    log prior_j + the document's total log-likelihood under expert j."""
    lp, starts = check_inputs(expert_logprobs, doc_starts)
    doc_ll = np.add.reduceat(lp, starts, axis=1)  # [N, D]
    unnorm = _log(normalize_prior(prior, lp.shape[0]))[:, None] + doc_ll
    return (np.exp(unnorm - logsumexp(unnorm, axis=0)[None, :])).T


def estimate_prior(expert_logprobs_heldout, doc_starts, n_batches: int | None = None,
                   alpha: float = 0.3, batch_docs: int = 2) -> np.ndarray:
    """The cached domain prior: EWMA of batch posteriors over held-out data (DEMix / BTM).

    Exact definition: documents are taken in order in batches of ``batch_docs``; a batch's
    posterior is the mean over its documents of P(D=j | document) (``document_posteriors``
    with a uniform prior); the prior is the exponentially weighted moving average of the
    first ``n_batches`` batch posteriors (None = all), ``prior_1 = post_1``,
    ``prior_b = (1 - alpha) * prior_{b-1} + alpha * post_b`` (pandas ``ewm(alpha,
    adjust=False)``, as in the reference implementation). Returns [N] summing to 1.
    """
    _check_ewma(alpha, batch_docs, n_batches, "batch_docs")
    post = document_posteriors(expert_logprobs_heldout, doc_starts)  # [D, N]
    return ewma_of_batches(post, batch_docs, n_batches, alpha)


def _check_ewma(alpha: float, batch_size: int, n_batches: int | None, what: str) -> None:
    if not 0 < alpha <= 1:
        raise BtmError(f"prior alpha must be in (0, 1], got {alpha}")
    if batch_size < 1:
        raise BtmError(f"prior {what} must be at least 1, got {batch_size}")
    if n_batches is not None and n_batches < 1:
        raise BtmError(f"prior n_batches must be at least 1, got {n_batches}")


def ewma_of_batches(post: np.ndarray, batch_size: int, n_batches: int | None, alpha: float) -> np.ndarray:
    """[N] EWMA (pandas ``ewm(alpha, adjust=False)``) of the means of consecutive batches of
    ``batch_size`` rows of ``post`` ([rows, N]), over the first ``n_batches`` (None: all)."""
    batch_of_row = np.arange(post.shape[0]) // batch_size
    n_avail = int(batch_of_row[-1]) + 1
    used = n_avail if n_batches is None else min(n_batches, n_avail)
    prior = None
    for b in range(used):
        batch_post = post[batch_of_row == b].mean(axis=0)
        prior = batch_post if prior is None else (1 - alpha) * prior + alpha * batch_post
    return prior / prior.sum()


def block_end_posteriors(expert_logprobs, block_tokens: int) -> np.ndarray:
    """[B, N] for each block of ``block_tokens`` consecutive tokens (the split as one stream,
    document boundaries ignored, the last block may be shorter): the previous-token posterior
    at the block's last token, softmax_j log p_j(x_{e-2}) with a uniform prior (e = block end);
    a one-token block has no previous token and gets the uniform prior."""
    lp = np.asarray(expert_logprobs, dtype=np.float64)
    n, t = lp.shape
    starts = np.arange(0, t, block_tokens)
    ends = np.minimum(starts + block_tokens, t)
    prev = np.where(ends - starts >= 2, ends - 2, -1)
    logits = np.where(prev >= 0, lp[:, np.maximum(prev, 0)], 0.0)  # [N, B]; 0 = uniform
    return np.exp(logits - logsumexp(logits, axis=0)[None, :]).T


def estimate_prior_block_end(expert_logprobs_heldout, block_tokens: int = 1024, n_batches: int | None = None,
                             alpha: float = 0.3, batch_blocks: int = 2) -> np.ndarray:
    """The cached prior as DEMix's released evaluation code estimates it (docs/evaluation.md
    cites the source): the EWMA (alpha 0.3, pandas ``adjust=False``) over batches of
    ``batch_blocks`` blocks of the batch mean of ``block_end_posteriors``. Much softer than
    ``estimate_prior``: each block contributes one token's likelihood, not a document's."""
    _check_ewma(alpha, batch_blocks, n_batches, "batch_blocks")
    if block_tokens < 1:
        raise BtmError(f"prior block_tokens must be at least 1, got {block_tokens}")
    lp, _ = check_inputs(expert_logprobs_heldout, np.array([0]))
    return ewma_of_batches(block_end_posteriors(lp, block_tokens), batch_blocks, n_batches, alpha)


def temper_prior(prior, temperature: float) -> np.ndarray:
    """``prior ** (1 / temperature)``, renormalized (in log space): T > 1 flattens towards
    uniform over the prior's support, T < 1 sharpens, T = 1 is the prior itself."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise BtmError(f"prior temperature must be a positive finite number, got {temperature}")
    log_p = _log(normalize_prior(prior, len(np.asarray(prior).reshape(-1)))) / temperature
    return np.exp(log_p - logsumexp(log_p, axis=0))


def choose_temperature(expert_logprobs, doc_starts, prior, temperatures) -> tuple[float, dict]:
    """(the temperature whose tempered prior gives the lowest nll of the fixed-prior ensemble
    ``method='prior'`` on these scores, {temperature: nll}); ties go to the earlier one."""
    if len(temperatures) == 0:
        raise BtmError("prior temperatures must list at least one value")
    nlls = {float(t): nll(ensemble_logprobs(expert_logprobs, doc_starts, "prior", temper_prior(prior, t)))
            for t in temperatures}
    return min(nlls, key=lambda t: (nlls[t], list(nlls).index(t))), nlls
