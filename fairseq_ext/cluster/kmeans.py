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


def squared_distances(x: np.ndarray, centres: np.ndarray, x_sq: np.ndarray | None = None) -> np.ndarray:
    """||x_i - c_j||^2 [n, k], clipped at 0 (float32 when both inputs are). ``x_sq``: the
    precomputed squared norms of x's rows, when calling repeatedly with the same x."""
    if x_sq is None:
        x_sq = np.einsum("ij,ij->i", x, x)
    d = x_sq[:, None] - 2.0 * (x @ centres.T)
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
        if len(open_idx) < k:
            sub = cost[np.ix_(pending, open_idx)]
        else:
            sub = cost if len(pending) == n else cost[pending]
        if sub.shape[1] > 1:
            # one argpartition gives the nearest (position 0) and second-nearest (position 1)
            two = np.argpartition(sub, 1, axis=1)[:, :2]
            best = two[:, 0]
            vals = np.take_along_axis(sub, two, axis=1)
            regret = vals[:, 1] - vals[:, 0]
        else:
            best = np.zeros(len(pending), dtype=np.int64)
            regret = np.zeros(len(pending), dtype=cost.dtype)
        choice = open_idx[best]
        # Proposers grouped by centre, highest regret first, then lowest point index
        # (lexsort is stable and ``pending`` is ascending).
        order = np.lexsort((-regret, choice))
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
    """Mean of each cluster's points (a cluster with no points keeps its old centre).

    Sums are a one-hot [k, n] x [n, d] matrix product: one multithreaded BLAS call, the same
    cost as the distance step, instead of a gather + segmented sum."""
    onehot = np.zeros((k, len(x)), dtype=x.dtype)
    onehot[labels, np.arange(len(x))] = 1
    sums = onehot @ x
    counts = np.bincount(labels, minlength=k)
    out = old.astype(x.dtype, copy=True)
    nz = counts > 0
    out[nz] = sums[nz] / counts[nz, None].astype(x.dtype)
    return out


@dataclass
class KMeansResult:
    centres: np.ndarray  # [k, d]
    labels: np.ndarray  # [n] balanced assignment of the fitted points
    inertia: float  # sum of squared distances under ``labels``
    iterations: int


def balanced_kmeans(x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 100,
                    tol: float = 1e-4, n_init: int = 1, batch_size: int = 65_536,
                    minibatch_epochs: float = 10.0, threads: int | None = 1) -> KMeansResult:
    """Fit balanced k-means on x [n, d] (n >= k). Full-batch Lloyd when n <= batch_size,
    else minibatches; either way the returned labels are an exactly balanced assignment.

    ``threads`` caps BLAS threads during the fit (None: leave BLAS as configured). The
    products here are skinny ([n, d] x [d, k]); on a shared or oversubscribed machine
    multithreaded OpenBLAS was 5-10x *slower* on them (docs/benchmarks.md), so the default
    is 1, as scikit-learn's own k-means does inside its iterations.
    """
    if threads is None:
        return _balanced_kmeans(x, k, seed, max_iter, tol, n_init, batch_size, minibatch_epochs)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        return _balanced_kmeans(x, k, seed, max_iter, tol, n_init, batch_size, minibatch_epochs)


def _balanced_kmeans(x, k, seed, max_iter, tol, n_init, batch_size, minibatch_epochs) -> KMeansResult:
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
            result = _lloyd(x, centres, max_iter, tol)
        else:
            result = _minibatch(x, centres, init_rng, batch_size, minibatch_epochs, abs_tol)
        if best is None or result.inertia < best.inertia:
            best = result
    return best


def _lloyd(x, centres, max_iter, rel_tol) -> KMeansResult:
    """Lloyd iterations with the balanced assignment step. Greedy balanced steps need not
    decrease the objective monotonically (they can cycle between near-equal assignments), so
    this stops when the labels repeat or the objective improves by less than ``rel_tol``
    (relative), and returns the best (centres, balanced labels) pair seen."""
    k = len(centres)
    x_sq = np.einsum("ij,ij->i", x, x)
    rows = np.arange(len(x))
    best: KMeansResult | None = None
    labels, previous = None, np.inf
    for it in range(1, max_iter + 1):
        d = squared_distances(x, centres, x_sq)
        new_labels = balanced_assign(d)
        inertia = float(d[rows, new_labels].sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(centres, new_labels, inertia, it)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        if np.isfinite(previous) and previous - inertia <= rel_tol * previous:
            break
        labels, previous = new_labels, inertia
        centres = centre_means(x, labels, k, centres)
    best.iterations = it
    return best


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
