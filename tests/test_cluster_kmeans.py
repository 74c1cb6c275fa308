"""Balanced k-means (fairseq_ext/cluster/kmeans.py): the capacity bound holds exactly."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fairseq_ext.cluster.kmeans import (balanced_assign, balanced_kmeans, kmeans_plus_plus,
                                        nearest_centre, squared_distances)


def _check_balanced(labels, n, k):
    sizes = np.bincount(labels, minlength=k)
    assert len(labels) == n and labels.min() >= 0 and labels.max() < k
    assert sizes.max() <= -(-n // k)  # ceil(n/k), exactly
    assert sizes.min() >= n // k  # and no cluster is short (none empty)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["uniform", "ties", "one_cluster_wanted", "integers"]))
def test_balanced_assign_capacity_exact(n, k, seed, kind):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        cost = rng.random((n, k))
    elif kind == "ties":
        cost = np.zeros((n, k))
    elif kind == "one_cluster_wanted":  # everyone prefers cluster 0
        cost = rng.random((n, k)) + 10.0
        cost[:, 0] = 0.0
    else:
        cost = rng.integers(0, 3, size=(n, k)).astype(np.float32)
    _check_balanced(balanced_assign(cost), n, k)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), k=st.integers(1, 12), d=st.integers(1, 8), seed=st.integers(0, 10**6),
       duplicates=st.booleans())
def test_balanced_kmeans_capacity_exact_on_random_data(n, k, d, seed, duplicates):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if duplicates:
        x = x[rng.integers(0, max(1, n // 5), size=n)]  # heavy exact duplicates
    result = balanced_kmeans(x, k, seed=seed, max_iter=20)
    _check_balanced(result.labels, n, k)
    assert result.centres.shape == (k, d) and np.isfinite(result.centres).all()


def test_minibatch_mode_is_balanced_and_deterministic():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3001, 5)).astype(np.float32)
    a = balanced_kmeans(x, 7, seed=3, batch_size=500)
    b = balanced_kmeans(x, 7, seed=3, batch_size=500)
    _check_balanced(a.labels, 3001, 7)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.centres, b.centres)


def test_prefers_the_optimal_assignment_when_it_is_balanced():
    # 3 well-separated blobs of equal size: balanced k-means must recover them exactly.
    rng = np.random.default_rng(1)
    means = np.array([[10, 0], [0, 10], [-10, -10]], dtype=np.float32)
    x = np.concatenate([m + rng.standard_normal((50, 2)).astype(np.float32) for m in means])
    labels = balanced_kmeans(x, 3, seed=0).labels
    for blob in range(3):
        assert len(set(labels[blob * 50:(blob + 1) * 50])) == 1
    assert len(set(labels)) == 3


def test_balance_overrides_nearest_centre_when_needed():
    cost = np.array([[0.0, 1.0], [0.0, 5.0], [0.0, 2.0], [0.0, 3.0]])
    labels = balanced_assign(cost)
    # two must move to cluster 1: the two with the smallest regret (rows 0 and 2)
    assert labels.tolist() == [1, 0, 1, 0]


def test_k_equals_one_and_k_equals_n():
    x = np.random.default_rng(0).standard_normal((9, 3)).astype(np.float32)
    assert balanced_kmeans(x, 1).labels.tolist() == [0] * 9
    assert sorted(balanced_kmeans(x, 9).labels.tolist()) == list(range(9))


def test_k_larger_than_n_is_an_error():
    with pytest.raises(ValueError, match="k <= n"):
        balanced_kmeans(np.zeros((3, 2), np.float32), 4)


def test_all_identical_points_still_balanced():
    x = np.zeros((10, 4), dtype=np.float32)  # e.g. documents with no known term
    centres = kmeans_plus_plus(x, 3, np.random.default_rng(0))
    assert np.isfinite(centres).all()
    _check_balanced(balanced_kmeans(x, 3).labels, 10, 3)


def test_nearest_centre_matches_bruteforce():
    rng = np.random.default_rng(2)
    x, c = rng.standard_normal((50, 4)), rng.standard_normal((6, 4))
    brute = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    assert np.allclose(squared_distances(x, c), brute)
    assert np.array_equal(nearest_centre(x, c), brute.argmin(1))
