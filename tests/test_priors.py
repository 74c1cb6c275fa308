"""Cached domain priors and branch weights (fairseq_ext/priors.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from eval_fixtures import tiny_data, tiny_experts  # noqa: F401
from fairseq_ext import ensemble
from fairseq_ext.priors import PriorSettings, cached_domain_prior, estimate_prior, top_k_weights
from launcher.contract.errors import BtmError


@dataclass
class FakeScores:
    """Stands in for scoring.Scores (same fields the prior code reads) in the pure tests."""
    logprobs: np.ndarray
    doc_starts: np.ndarray
    key: dict
    path: Path = Path("x.npz")

    @property
    def tokens(self) -> int:
        return len(self.logprobs)


def fake_scores(n=3, t=60, seed=0):
    rng = np.random.default_rng(seed)
    starts = np.array([0, 9, 20, 33, 41, 52])
    return [FakeScores(np.log(rng.uniform(0.05, 1, t)).astype(np.float32), starts, {"expert": j})
            for j in range(n)]


def test_estimate_prior_is_the_mixing_definition():
    assert estimate_prior is ensemble.estimate_prior


def test_prior_is_estimated_once_then_read_from_json(tmp_path):
    scores = fake_scores()
    experts = {"a": "sha-a", "b": "sha-b", "c": "sha-c"}
    settings = PriorSettings(alpha=0.3, batch_docs=2, temperatures=(1.0,))  # untempered: the estimate itself
    prior, path, cached, temperature = cached_domain_prior(tmp_path, "legal", experts, scores, settings)
    assert temperature == 1.0 and saved_temperature(path) == 1.0
    assert not cached and path.parent == tmp_path and path.name.startswith("legal.")
    lp = np.stack([s.logprobs for s in scores])
    np.testing.assert_allclose(prior, ensemble.estimate_prior(lp, scores[0].doc_starts, alpha=0.3, batch_docs=2))
    saved = json.loads(path.read_text())
    assert saved["key"]["settings"] == {"split": "valid", "alpha": 0.3, "n_batches": None, "batch_docs": 2,
                                        "estimator": "document", "block_tokens": 1024, "temperatures": [1.0]}
    assert saved["estimator"] == "document"
    assert saved["key"]["experts"] == ["a", "b", "c"]
    assert sum(saved["by_expert"].values()) == pytest.approx(1.0)
    again, path2, cached2, _ = cached_domain_prior(tmp_path, "legal", experts, scores, settings)
    assert cached2 and path2 == path
    np.testing.assert_array_equal(again, prior)
    # Other settings or other experts are another cache entry.
    _, path3, cached3, _ = cached_domain_prior(tmp_path, "legal", experts, scores,
                                               PriorSettings(alpha=0.5, temperatures=(1.0,)))
    assert not cached3 and path3 != path
    assert PriorSettings(alpha=0.5, n_batches=4, temperatures=(1.0,)).describe() == \
        "ewma(alpha=0.5,batches=4,batch_docs=2,split=valid)"


def test_default_prior_is_the_document_one_with_t_chosen_on_valid(tmp_path):
    """The default won on btm-forest's valid split (docs/evaluation.md): the document estimator,
    tempered with the T among 1, 3, 10, 30, 100 whose fixed-prior ensemble is best on valid."""
    scores = fake_scores(seed=2)
    experts = {"a": "sha-a", "b": "sha-b", "c": "sha-c"}
    lp = np.stack([s.logprobs for s in scores]).astype(np.float64)
    settings = PriorSettings()
    assert settings.estimator == "document" and settings.temperatures == (1.0, 3.0, 10.0, 30.0, 100.0)
    prior, path, _, temperature = cached_domain_prior(tmp_path, "legal", experts, scores, settings)
    untempered = ensemble.estimate_prior(lp, scores[0].doc_starts, alpha=0.3, batch_docs=2)
    nll = {t: ensemble.nll(ensemble.ensemble_logprobs(lp, scores[0].doc_starts, "prior",
                                                      ensemble.temper_prior(untempered, t)))
           for t in settings.temperatures}
    assert temperature == min(nll, key=nll.get)
    np.testing.assert_allclose(prior, ensemble.temper_prior(untempered, temperature), rtol=1e-12)
    saved = json.loads(path.read_text())
    assert saved["heldout_nll_by_temperature"] == pytest.approx({f"{t:g}": v for t, v in nll.items()})
    assert settings.describe() == "ewma(alpha=0.3,batches=all,batch_docs=2,split=valid),T=best_of(1/3/10/30/100)"
    assert settings.describe(temperature) == \
        f"ewma(alpha=0.3,batches=all,batch_docs=2,split=valid),T={temperature:g}(chosen)"


def saved_temperature(path):
    return json.loads(path.read_text())["temperature"]


def test_block_end_prior_with_a_temperature_chosen_on_the_heldout_split(tmp_path):
    scores = fake_scores(seed=1)
    experts = {"a": "sha-a", "b": "sha-b", "c": "sha-c"}
    lp = np.stack([s.logprobs for s in scores]).astype(np.float64)
    settings = PriorSettings(estimator="block_end", block_tokens=8, batch_docs=2, temperatures=(0.5, 1.0, 4.0))
    prior, path, cached, temperature = cached_domain_prior(tmp_path, "legal", experts, scores, settings)
    untempered = ensemble.estimate_prior_block_end(lp, block_tokens=8, batch_blocks=2)
    nll = {t: ensemble.nll(ensemble.ensemble_logprobs(lp, scores[0].doc_starts, "prior",
                                                      ensemble.temper_prior(untempered, t)))
           for t in (0.5, 1.0, 4.0)}
    assert not cached and temperature == min(nll, key=nll.get)
    np.testing.assert_allclose(prior, ensemble.temper_prior(untempered, temperature), rtol=1e-12)
    saved = json.loads(path.read_text())
    assert saved["estimator"] == "block_end" and saved["temperature"] == temperature
    np.testing.assert_allclose(saved["untempered_prior"], untempered, rtol=1e-12)
    assert saved["heldout_nll_by_temperature"] == pytest.approx({f"{t:g}": v for t, v in nll.items()})
    again = cached_domain_prior(tmp_path, "legal", experts, scores, settings)
    assert again.cached and again.temperature == temperature
    assert settings.describe(temperature) == (
        f"block_end(alpha=0.3,batches=all,batch_blocks=2,block_tokens=8,split=valid),T={temperature:g}(chosen)")


@pytest.mark.parametrize("bad, match", [
    (dict(estimator="last_token"), "unknown prior estimator 'last_token'; known: document, block_end"),
    (dict(temperatures=()), "at least one value"),
    (dict(temperatures=(1.0, 0.0)), "positive finite numbers, got 0.0"),
    (dict(temperatures=(float("inf"),)), "positive finite numbers, got inf"),
    (dict(block_tokens=0), "block_tokens must be at least 1"),
])
def test_bad_prior_settings_name_the_value(tmp_path, bad, match):
    with pytest.raises(BtmError, match=match):
        cached_domain_prior(tmp_path, "legal", {"a": "", "b": "", "c": ""}, fake_scores(), PriorSettings(**bad))


def test_scores_of_different_tokens_are_refused(tmp_path):
    scores = fake_scores()
    scores[1] = FakeScores(scores[1].logprobs[:50], np.array([0, 9]), {}, Path("other.npz"))
    with pytest.raises(BtmError, match="other.npz and x.npz cover different tokens"):
        cached_domain_prior(tmp_path, "legal", {"a": "", "b": "", "c": ""}, scores, PriorSettings())


def test_top_k_weights():
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    assert top_k_weights(w, None) == pytest.approx(w)
    assert top_k_weights(w, 1) == {"b": 1.0}
    assert top_k_weights(w, 2) == pytest.approx({"b": 0.625, "c": 0.375})
    assert top_k_weights({"a": 0.5, "b": 0.5}, 1) == {"a": 1.0}
    with pytest.raises(BtmError, match="top_k must be at least 1"):
        top_k_weights(w, 0)


@pytest.mark.fairseq
def test_branch_weights_prefer_the_expert_of_the_closest_domain(tiny_data, tiny_experts, tmp_path):
    from fairseq_ext.priors import branch_weights

    full = branch_weights(tiny_experts, tiny_data, "legal", "valid", sample_docs=4, top_k=None,
                          cache_dir=tmp_path)
    assert set(full) == set(tiny_experts) and sum(full.values()) == pytest.approx(1.0)
    assert max(full, key=full.get) == "legal"
    assert branch_weights(tiny_experts, tiny_data, "legal", "valid", 4, 1, cache_dir=tmp_path) == {"legal": 1.0}
    two = branch_weights(tiny_experts, tiny_data, "legal", "valid", 4, 2, cache_dir=tmp_path)
    assert len(two) == 2 and "legal" in two and sum(two.values()) == pytest.approx(1.0)
    # The cache was used: one score file per expert, each covering only the sample.
    assert len(list(tmp_path.glob("*.npz"))) == 3
    # A list of checkpoint paths (as branch.py may pass) is keyed by path; no cache_dir is fine.
    by_path = branch_weights(list(tiny_experts.values()), tiny_data, "legal", "valid", 4, None)
    assert by_path == pytest.approx({str(p): full[n] for n, p in tiny_experts.items()})
