"""Properties of the ensemble rules (fairseq_ext/ensemble.py), checked against slow loops."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fairseq_ext import ensemble
from launcher.contract.errors import BtmError


@st.composite
def forests(draw, min_experts=1, max_experts=5):
    """Random expert log-probs [N, T] plus document starts."""
    n = draw(st.integers(min_experts, max_experts))
    t = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Log-probs of real next-token distributions: log of a random probability in (0, 1].
    lp = np.log(rng.uniform(1e-6, 1.0, size=(n, t))).astype(np.float32)
    cuts = sorted(set(rng.integers(1, t, size=rng.integers(0, 4)).tolist())) if t > 1 else []
    starts = np.array([0] + cuts, dtype=np.int64)
    prior = rng.dirichlet(np.ones(n))
    return lp, starts, prior


def slow_weights(lp, starts, prior, method):
    """Reference loop: the weights of every method written out token by token."""
    lp = lp.astype(np.float64)
    n, t = lp.shape
    out = np.zeros((n, t))
    start_set = set(starts.tolist())
    prefix = np.zeros(n)
    for i in range(t):
        if i in start_set:
            prefix = np.zeros(n)
        if method == "uniform":
            w = np.full(n, 1.0 / n)
        elif method == "prior":
            w = prior.copy()
        elif method == "posterior":
            u = np.log(prior) + prefix
            w = np.exp(u - u.max())
        elif method == "prev_token":
            u = np.log(prior) + (0.0 if i in start_set else lp[:, i - 1])
            w = np.exp(u - u.max())
        out[:, i] = w / w.sum()
        prefix = prefix + lp[:, i]
    return out


def slow_mixture(lp, weights):
    return np.log(np.sum(weights * np.exp(lp.astype(np.float64)), axis=0))


@settings(max_examples=60, deadline=None)
@given(forests(), st.sampled_from(ensemble.METHODS))
def test_every_method_matches_a_slow_loop(forest, method):
    lp, starts, prior = forest
    expected = slow_mixture(lp, slow_weights(lp, starts, prior, method))
    got = ensemble.ensemble_logprobs(lp, starts, method=method, prior=prior)
    assert got.dtype == np.float64 and got.shape == (lp.shape[1],)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(forests(), st.data())
def test_one_hot_prior_gives_exactly_that_experts_scores(forest, data):
    lp, starts, _ = forest
    j = data.draw(st.integers(0, lp.shape[0] - 1))
    one_hot = np.eye(lp.shape[0])[j]
    for method in ("prior", "posterior", "prev_token"):
        got = ensemble.ensemble_logprobs(lp, starts, method=method, prior=one_hot)
        np.testing.assert_array_equal(got, lp[j].astype(np.float64))


@settings(max_examples=60, deadline=None)
@given(forests())
def test_fixed_prior_mixture_is_no_worse_than_the_weighted_mean_of_experts(forest):
    lp, starts, prior = forest
    mixture_nll = ensemble.nll(ensemble.ensemble_logprobs(lp, starts, method="prior", prior=prior))
    expert_nlls = -lp.astype(np.float64).mean(axis=1)
    assert mixture_nll <= float(prior @ expert_nlls) + 1e-9  # Jensen


@settings(max_examples=40, deadline=None)
@given(forests(), st.integers(1, 6))
def test_identical_experts_give_the_single_experts_perplexity(forest, copies):
    lp, starts, _ = forest
    same = np.repeat(lp[:1], copies, axis=0)
    single_ppl = math.exp(-lp[0].astype(np.float64).mean())
    for method in ensemble.METHODS:
        ppl = math.exp(ensemble.nll(ensemble.ensemble_logprobs(same, starts, method=method)))
        assert ppl == pytest.approx(single_ppl, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(forests(), st.sampled_from(ensemble.METHODS))
def test_top_k_with_k_equal_n_is_the_full_ensemble(forest, method):
    lp, starts, prior = forest
    full = ensemble.ensemble_logprobs(lp, starts, method=method, prior=prior)
    topn = ensemble.ensemble_logprobs(lp, starts, method=method, prior=prior, top_k=lp.shape[0])
    np.testing.assert_array_equal(full, topn)


@settings(max_examples=40, deadline=None)
@given(forests(min_experts=2), st.data())
def test_top_k_keeps_the_k_highest_weights_and_renormalizes(forest, data):
    lp, starts, prior = forest
    n = lp.shape[0]
    k = data.draw(st.integers(1, n - 1))
    w = slow_weights(lp, starts, prior, "posterior")
    kept = np.zeros_like(w)
    for i in range(w.shape[1]):
        top = np.argsort(-w[:, i], kind="stable")[:k]
        kept[top, i] = w[top, i]
    kept /= kept.sum(axis=0, keepdims=True)
    got = ensemble.ensemble_logprobs(lp, starts, method="posterior", prior=prior, top_k=k)
    np.testing.assert_allclose(got, slow_mixture(lp, kept), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(forests(), st.sampled_from(["posterior", "prev_token"]))
def test_posterior_right_after_a_document_boundary_is_the_prior(forest, method):
    lp, starts, prior = forest
    w = np.exp(ensemble.log_weights(lp, starts, method=method, prior=prior))
    for s in starts:
        np.testing.assert_allclose(w[:, s], prior, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-12)


def test_prior_top_k_uses_only_the_selected_experts():
    rng = np.random.default_rng(0)
    lp = np.log(rng.uniform(0.01, 1, size=(4, 30)))
    starts = np.array([0, 10, 21])
    prior = np.array([0.1, 0.4, 0.2, 0.3])
    keep = ensemble.topk_experts(prior, 2)
    assert keep == [1, 3]
    sparse = ensemble.ensemble_logprobs(lp[keep], starts, method="prior", prior=prior[keep])
    dense = ensemble.ensemble_logprobs(lp, starts, method="prior", prior=prior, top_k=2)
    np.testing.assert_allclose(sparse, dense, rtol=1e-12)


def test_mix_with_weights_matches_methods_and_per_token_weights():
    rng = np.random.default_rng(1)
    lp = np.log(rng.uniform(0.01, 1, size=(3, 12)))
    prior = np.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(ensemble.mix_with_weights(lp, prior),
                               ensemble.ensemble_logprobs(lp, [0], "prior", prior), rtol=1e-12)
    per_token = rng.dirichlet(np.ones(3), size=12)  # [T, N]
    expected = np.log(np.sum(per_token.T * np.exp(lp), axis=0))
    np.testing.assert_allclose(ensemble.mix_with_weights(lp, per_token * 7.0), expected, rtol=1e-12)


def test_long_documents_do_not_underflow():
    # 20k tokens at ~-5 nats each: the prefix likelihood is exp(-1e5), far below float range.
    rng = np.random.default_rng(2)
    lp = np.stack([np.full(20000, -5.0), np.full(20000, -5.1)]) + rng.normal(0, 0.01, (2, 20000))
    lp = np.minimum(lp, 0)
    got = ensemble.ensemble_logprobs(lp, [0], "posterior")
    assert np.all(np.isfinite(got))
    # The posterior concentrates on the better expert, so the mixture approaches it.
    assert abs(got[-1000:].mean() - lp[0, -1000:].mean()) < 1e-6


def test_a_prior_near_the_float_maximum_normalizes_to_the_exact_ratios():
    # The plain sum of [1e308]*3 overflows to inf, which once gave zeros and a NaN ensemble.
    np.testing.assert_array_equal(ensemble.normalize_prior([1e308] * 3, 3), [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_array_equal(ensemble.normalize_prior([1e308, 0.0, 1e308], 3), [0.5, 0.0, 0.5])
    np.testing.assert_array_equal(ensemble.normalize_prior([1e-320, 3e-320], 2), [0.25, 0.75])
    lp = np.log(np.array([[0.5, 0.25, 0.5], [0.25, 0.5, 0.5], [0.125, 0.125, 0.5]]))
    for method in ("prior", "posterior", "prev_token"):
        np.testing.assert_array_equal(ensemble.ensemble_logprobs(lp, [0], method, prior=[1e308] * 3),
                                      ensemble.ensemble_logprobs(lp, [0], method, prior=None))
    with pytest.raises(BtmError, match="finite and non-negative"):
        ensemble.normalize_prior([np.inf, 1.0], 2)
    with pytest.raises(BtmError, match="positive sum"):
        ensemble.normalize_prior([0.0, 0.0], 2)


def test_a_documents_prefix_likelihood_does_not_depend_on_the_documents_before_it():
    # A long first document (~ -1e5 nats) ahead of a short one: a running sum over the whole
    # split carries that document's rounding into the second (-0.1 is not exact in binary).
    second = np.array([[-0.1, -0.2, -0.3], [-0.7, -0.2, -0.9]])
    lp = np.concatenate([np.full((2, 10000), -9.87), second], axis=1)
    got = ensemble.prefix_loglik(lp, np.array([0, 10000]))
    expected = np.array([[0.0, -0.1, -0.1 + -0.2], [0.0, -0.7, -0.7 + -0.2]])
    np.testing.assert_array_equal(got[:, 10000:], expected)
    np.testing.assert_array_equal(got[:, :3], [[0.0, -9.87, -9.87 * 2]] * 2)
    # So the posterior on the second document is the one it has alone.
    alone = ensemble.log_weights(second, [0], "posterior")
    np.testing.assert_array_equal(ensemble.log_weights(lp, [0, 10000], "posterior")[:, 10000:], alone)


def test_estimate_prior_is_the_ewma_of_batch_posteriors():
    rng = np.random.default_rng(3)
    lp = np.log(rng.uniform(0.05, 1, size=(3, 50)))
    starts = np.array([0, 7, 15, 22, 30, 41])
    doc_post = ensemble.document_posteriors(lp, starts)
    np.testing.assert_allclose(doc_post.sum(axis=1), 1.0)
    batches = [doc_post[0:2].mean(0), doc_post[2:4].mean(0), doc_post[4:6].mean(0)]
    expected = batches[0]
    for b in batches[1:]:
        expected = 0.7 * expected + 0.3 * b
    np.testing.assert_allclose(ensemble.estimate_prior(lp, starts, alpha=0.3, batch_docs=2), expected)
    # n_batches limits how much held-out data is used.
    np.testing.assert_allclose(ensemble.estimate_prior(lp, starts, n_batches=1, batch_docs=2), batches[0])
    # Agrees with pandas' ewm(adjust=False), the reference implementation's estimator.
    import pandas as pd
    ref = pd.DataFrame(np.array(batches)).ewm(alpha=0.3, adjust=False).mean().to_numpy()[-1]
    np.testing.assert_allclose(ensemble.estimate_prior(lp, starts, batch_docs=2), ref)


def test_block_end_prior_is_the_ewma_of_previous_token_posteriors_at_block_ends():
    # 7 tokens in blocks of 3: [0,3) [3,6) [6,7). A block's posterior uses the token before its
    # last one (tokens 1 and 4); the one-token block has none and is uniform.
    p = np.array([[0.5, 0.6, 0.5, 0.5, 0.2, 0.5, 0.5],
                  [0.5, 0.2, 0.5, 0.5, 0.6, 0.5, 0.5]])
    np.testing.assert_allclose(ensemble.block_end_posteriors(np.log(p), 3),
                               [[0.75, 0.25], [0.25, 0.75], [0.5, 0.5]], rtol=1e-12)
    # Batches of 2 blocks: mean([.75,.25],[.25,.75]) = [.5,.5], then [.5,.5]: EWMA [.5,.5].
    np.testing.assert_allclose(ensemble.estimate_prior_block_end(np.log(p), 3, batch_blocks=2), [0.5, 0.5])
    # One block per batch: 0.75 -> 0.7*0.75 + 0.3*0.25 = 0.6 -> 0.7*0.6 + 0.3*0.5 = 0.57.
    np.testing.assert_allclose(ensemble.estimate_prior_block_end(np.log(p), 3, batch_blocks=1),
                               [0.57, 0.43], rtol=1e-12)
    np.testing.assert_allclose(ensemble.estimate_prior_block_end(np.log(p), 3, n_batches=1, batch_blocks=1),
                               [0.75, 0.25], rtol=1e-12)


def test_temperature_flattens_or_sharpens_the_prior():
    np.testing.assert_allclose(ensemble.temper_prior([0.8, 0.2, 0.0], 2.0), [2 / 3, 1 / 3, 0.0], rtol=1e-12)
    np.testing.assert_allclose(ensemble.temper_prior([2 / 3, 1 / 3], 0.5), [0.8, 0.2], rtol=1e-12)
    np.testing.assert_allclose(ensemble.temper_prior([0.8, 0.2], 1.0), [0.8, 0.2], rtol=1e-12)
    # Expert 1 fits every token better, so a prior that favours expert 0 is best flattened.
    lp = np.log(np.array([[0.2, 0.2, 0.2], [0.4, 0.4, 0.4]]))
    chosen, nlls = ensemble.choose_temperature(lp, [0], [0.99, 0.01], [0.5, 1.0, 100.0])
    assert chosen == 100.0 and nlls[100.0] < nlls[1.0] < nlls[0.5]
    with pytest.raises(BtmError, match="positive finite"):
        ensemble.temper_prior([0.5, 0.5], 0.0)


def test_estimate_prior_prefers_the_expert_that_fits_the_data():
    rng = np.random.default_rng(4)
    good = np.log(rng.uniform(0.3, 1, size=200))
    bad = np.log(rng.uniform(0.01, 0.3, size=200))
    prior = ensemble.estimate_prior(np.stack([bad, good]), np.arange(0, 200, 20))
    assert prior[1] > 0.9


@pytest.mark.parametrize("bad, match", [
    (dict(expert_logprobs=np.zeros((2, 0))), "non-empty"),
    (dict(expert_logprobs=np.array([[0.0, np.nan]])), "non-finite value at expert 0, token 1"),
    (dict(expert_logprobs=np.array([[0.0, 0.5]])), "<= 0"),
    (dict(doc_starts=[1]), "start at 0"),
    (dict(doc_starts=[0, 3, 3]), "increase strictly"),
    (dict(doc_starts=[0.0]), "integer"),
    (dict(method="majority"), "unknown mixing method 'majority'"),
    (dict(prior=[1.0]), "prior has 1 entries but there are 2 experts"),
    (dict(prior=[-1.0, 2.0]), "non-negative"),
    (dict(top_k=0), "top_k must be at least 1"),
])
def test_bad_input_names_the_fault(bad, match):
    kwargs = dict(expert_logprobs=np.log(np.full((2, 5), 0.5)), doc_starts=[0, 2], method="posterior",
                  prior=None, top_k=1)
    kwargs.update(bad)
    with pytest.raises(BtmError, match=match):
        ensemble.ensemble_logprobs(**kwargs)


def test_mixing_imports_neither_fairseq_nor_torch():
    code = ("import sys; import fairseq_ext.ensemble; "
            "assert 'torch' not in sys.modules and 'fairseq' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
