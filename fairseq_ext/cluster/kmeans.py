"""Balanced k-means: Lloyd iterations whose assignment step is capacity-constrained.

Every cluster ends with floor(N/k) or ceil(N/k) points (so none holds more than ceil(N/k) and
none is empty), exactly, by construction of ``balanced_assign``:

    a greedy-by-regret assignment in rounds. Each unassigned point proposes to its nearest
    *open* centre; its priority is its regret (distance to its second-nearest open centre minus
    distance to the nearest), i.e. how much it loses if it is bumped. Each centre keeps its
    highest-priority proposers up to floor(N/k); the N mod k "extra" seats (ceil(N/k)) go to
    the centres whose best bumped proposer has the highest regret. A centre that is full is
    closed. Every round with a bumped point closes a centre, so there are at most k + 1
    rounds, each fully vectorised (one partition, one lexsort).

Open seats always equal unassigned points, so the capacity holds exactly and no repair step
is needed. Ties break by point index, then centre index, so results are deterministic.

Large samples are fitted with minibatches (balanced within each batch, running-mean centre
updates as in scikit-learn's MiniBatchKMeans), then one balanced assignment of the whole
sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def squared_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """||x_i - c_j||^2 [n, k], clipped at 0 (float32 when both inputs are)."""
    d = np.einsum("ij,ij->i", x, x)[:, None] - 2.0 * (x @ centres.T)
    d += np.einsum("ij,ij->i", centres, centres)[None, :]
    np.maximum(d, 0, out=d)
    return d


def nearest_centre(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Unconstrained assignment: index of the nearest centre (ties -> lowest index)."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmin(squared_distances(x, centres), axis=1)


def balanced_assign(cost: np.ndarray) -> np.ndarray:
    """Assign n points to k clusters with sizes floor(n/k) or ceil(n/k), minimising cost
    greedily by regret (see the module docstring). ``cost``: [n, k]; returns labels [n]."""
    n, k = cost.shape
    if k < 1 or n < k:
        raise ValueError(f"balanced_assign needs 1 <= k <= n, got n={n}, k={k}")
    floor, extras = divmod(n, k)
    labels = np.full(n, -1, dtype=np.int64)
    filled = np.zeros(k, dtype=np.int64)
    open_ = np.ones(k, dtype=bool)
    pending = np.arange(n)
    while pending.size:
        open_idx = np.flatnonzero(open_)
        sub = cost[np.ix_(pending, open_idx)] if len(open_idx) < k else cost[pending]
        best = np.argmin(sub, axis=1)
        if sub.shape[1] > 1:
            two = np.partition(sub, 1, axis=1)
            regret = two[:, 1] - two[:, 0]
        else:
            regret = np.zeros(len(pending), dtype=cost.dtype)
        choice = open_idx[best]
        # Proposers grouped by centre, highest regret first, then lowest point index.
        order = np.lexsort((pending, -regret, choice))
        pts, ch, rg = pending[order], choice[order], regret[order]
        group_start = np.searchsorted(ch, np.arange(k))
        rank = np.arange(len(order)) - group_start[ch]
        room = floor - filled
        accept = rank < room[ch]
        labels[pts[accept]] = ch[accept]
        filled += np.bincount(ch[accept], minlength=k)
        # Extra seats: one per centre, to the centres whose best bumped proposer hurts most.
        first_bumped = (rank == room[ch]) & ~accept
        if extras > 0 and first_bumped.any():
            cand = np.flatnonzero(first_bumped)
            cand = cand[np.lexsort((ch[cand], -rg[cand]))][:extras]
            labels[pts[cand]] = ch[cand]
            filled[ch[cand]] += 1
            extras -= len(cand)
        open_ = (filled < floor) | ((filled == floor) & (extras > 0))
        pending = np.flatnonzero(labels < 0)
    return labels


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding with 2 + log(k) local trials (as scikit-learn); duplicates and
    all-zero data are handled (a zero potential falls back to a uniform draw)."""
    n = len(x)
    trials = 2 + int(np.log(k))
    centres = np.empty((k, x.shape[1]), dtype=x.dtype)
    first = int(rng.integers(n))
    centres[0] = x[first]
    closest = squared_distances(x, centres[:1])[:, 0].astype(np.float64)
    for c in range(1, k):
        pot = closest.sum()
        if pot <= 0:
            cand = rng.integers(n, size=trials)
        else:
            cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * pot)
            cand = np.minimum(cand, n - 1)
        d = squared_distances(x, x[cand]).astype(np.float64)
        new_closest = np.minimum(closest[:, None], d)
        best = int(np.argmin(new_closest.sum(axis=0)))
        centres[c] = x[cand[best]]
        closest = new_closest[:, best]
    return centres


def centre_means(x: np.ndarray, labels: np.ndarray, k: int, old: np.ndarray) -> np.ndarray:
    """Mean of each cluster's points (a cluster with no points keeps its old centre)."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sums[sorted_labels[starts]] = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    counts = np.bincount(labels, minlength=k)
    out = old.astype(np.float64).copy()
    nz = counts > 0
    out[nz] = sums[nz] / counts[nz, None]
    return out.astype(x.dtype)


@dataclass
class KMeansResult:
    centres: np.ndarray  # [k, d]
    labels: np.ndarray  # [n] balanced assignment of the fitted points
    inertia: float  # sum of squared distances under ``labels``
    iterations: int


def balanced_kmeans(x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 100,
                    tol: float = 1e-4, n_init: int = 1, batch_size: int = 65_536,
                    minibatch_epochs: float = 10.0) -> KMeansResult:
    """Fit balanced k-means on x [n, d] (n >= k). Full-batch Lloyd when n <= batch_size,
    else minibatches; either way the returned labels are an exactly balanced assignment."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"balanced_kmeans needs 1 <= k <= n, got n={n}, k={k}")
    rng = np.random.default_rng(seed)
    # scikit-learn's tolerance: relative to the mean per-feature variance of the data.
    abs_tol = tol * float(np.mean(np.var(x, axis=0))) if n > 1 else 0.0
    best: KMeansResult | None = None
    for _ in range(max(1, n_init)):
        init_rng = np.random.default_rng(rng.integers(2**63))
        init_pts = x if n <= batch_size else x[init_rng.choice(n, batch_size, replace=False)]
        centres = kmeans_plus_plus(init_pts, k, init_rng)
        if n <= batch_size:
            result = _lloyd(x, centres, max_iter, abs_tol)
        else:
            result = _minibatch(x, centres, init_rng, batch_size, minibatch_epochs, abs_tol)
        if best is None or result.inertia < best.inertia:
            best = result
    return best


def _lloyd(x, centres, max_iter, abs_tol) -> KMeansResult:
    k = len(centres)
    labels = None
    it = 0
    for it in range(1, max_iter + 1):
        new_labels = balanced_assign(squared_distances(x, centres))
        new_centres = centre_means(x, new_labels, k, centres)
        shift = float(((new_centres - centres) ** 2).sum())
        converged = labels is not None and np.array_equal(new_labels, labels)
        labels, centres = new_labels, new_centres
        if converged or shift <= abs_tol:
            break
    d = squared_distances(x, centres)
    labels = balanced_assign(d)
    return KMeansResult(centres, labels, float(d[np.arange(len(x)), labels].sum()), it)


def _minibatch(x, centres, rng, batch_size, epochs, abs_tol) -> KMeansResult:
    n, k = len(x), len(centres)
    centres = centres.astype(np.float64)
    counts = np.zeros(k, dtype=np.float64)
    steps = max(1, int(np.ceil(epochs * n / batch_size)))
    for step in range(1, steps + 1):
        batch = x[rng.choice(n, batch_size, replace=False)]
        lab = balanced_assign(squared_distances(batch, centres.astype(np.float32)))
        sizes = np.bincount(lab, minlength=k).astype(np.float64)
        sums = centre_means(batch, lab, k, centres.astype(np.float32)).astype(np.float64) * sizes[:, None]
        counts += sizes
        nz = sizes > 0
        old = centres.copy()
        centres[nz] += (sums[nz] - sizes[nz, None] * centres[nz]) / counts[nz, None]
        if step > k and float(((centres - old) ** 2).sum()) <= abs_tol * batch_size / n:
            break
    centres = centres.astype(np.float32)
    d = squared_distances(x, centres)
    labels = balanced_assign(d)
    return KMeansResult(centres, labels, float(d[np.arange(n), labels].sum()), step)
