"""Embedding, saved model (no pickle) and routing of fairseq_ext.cluster."""
import json
import zipfile

import numpy as np
import pytest

from fairseq_ext.cluster import FitSettings, fit_clusters, load_model, save_model
from fairseq_ext.cluster.routing import route_weights, token_route_weights
from fairseq_ext.cluster.tfidf import NUMBER_TOKEN, normalize_text
from launcher.contract.errors import BtmError

TOPICS = {
    "python": "def function return import class self lambda yield module package",
    "bible": "lord god israel said unto thee thou shalt king jerusalem",
    "law": "license copyright warranty liability permission software distribute",
}


def _texts(n_per=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for topic, words in TOPICS.items():
        w = words.split()
        for _ in range(n_per):
            out.append(" ".join(rng.choice(w, size=30)) + f" {rng.integers(1000)}")
    return out


@pytest.fixture(scope="module")
def model():
    return fit_clusters(_texts(), FitSettings(k=3, seed=0, dims=8))


def test_numbers_become_one_token_and_stop_words_are_dropped(model):
    assert normalize_text("Version 3.11 has 1,024 items") == f"version  {NUMBER_TOKEN}  has  {NUMBER_TOKEN}  items"
    assert NUMBER_TOKEN in model.embedder.vocabulary
    assert not {"the", "and", "is"} & set(model.embedder.vocabulary)
    # two texts differing only in their numbers embed identically
    a, b = model.embed(["unto thee 12 lord", "unto thee 99999 lord"])
    assert np.array_equal(a, b)


def test_embeddings_are_unit_norm_or_zero(model):
    h = model.embed(["lord god israel", "", "zzzz qqqq"])
    assert np.isclose(np.linalg.norm(h[0]), 1.0, atol=1e-5)
    assert not h[1].any() and not h[2].any()  # empty / no known term -> zero vector


def test_clusters_match_topics_and_are_balanced(model):
    labels = np.argmin(((model.embed(_texts(seed=5))[:, None] - model.centres[None]) ** 2).sum(-1), 1)
    for t in range(3):
        assert len(set(labels[t * 12:(t + 1) * 12])) == 1
    assert model.sizes.tolist() == [12, 12, 12]


def test_saved_model_has_no_pickle_and_embeds_identically(model, tmp_path):
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["k"] == 3 and meta["vocabulary"] == model.embedder.vocabulary
    with np.load(tmp_path / "model.npz", allow_pickle=False) as z:  # raises if any object array
        for name in z.files:
            assert z[name].dtype != object
    with zipfile.ZipFile(tmp_path / "model.npz") as zf:
        assert all(n.endswith(".npy") for n in zf.namelist())
    loaded = load_model(tmp_path)
    probe = _texts(n_per=4, seed=9) + ["", "license 2024 lord def"]
    assert np.array_equal(loaded.embed(probe), model.embed(probe))
    assert np.array_equal(loaded.centres, model.centres)
    assert np.array_equal(route_weights(loaded, probe), route_weights(model, probe))


def test_load_rejects_a_tampered_or_missing_model(model, tmp_path):
    with pytest.raises(BtmError, match="not a fitted cluster model"):
        load_model(tmp_path)
    save_model(model, tmp_path)
    with open(tmp_path / "model.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(BtmError, match="sha256"):
        load_model(tmp_path)


def test_route_weights_formula(model):
    texts = ["lord god israel unto thee", "def return import self class"]
    h = model.embed(texts)
    d2 = ((h[:, None, :].astype(np.float64) - model.centres[None].astype(np.float64)) ** 2).sum(-1)
    expected = np.exp(-d2 / 0.1)
    expected /= expected.sum(1, keepdims=True)
    w = route_weights(model, texts, temperature=0.1)
    assert w.shape == (2, 3) and np.allclose(w, expected, atol=1e-6)
    assert np.allclose(w.sum(1), 1.0)
    # higher temperature -> flatter
    assert route_weights(model, texts, temperature=10.0).max() < w.max()


def test_route_top_k_keeps_largest_and_renormalises(model):
    full = route_weights(model, ["lord license def"], temperature=1.0)[0]
    top = route_weights(model, ["lord license def"], temperature=1.0, top_k=2)[0]
    keep = np.argsort(-full, kind="stable")[:2]
    assert (top > 0).sum() == 2 and set(np.flatnonzero(top)) == set(keep)
    assert np.allclose(top[keep], full[keep] / full[keep].sum())
    assert np.allclose(route_weights(model, ["x"], top_k=1).sum(), 1.0)


def test_empty_context_routes_by_cluster_prior(model):
    w = route_weights(model, ["", "   "], top_k=None)
    assert np.allclose(w, model.prior)


def test_token_route_weights_use_only_the_prefix(model):
    doc_a = ["lord ", "god ", "israel ", "def ", "return ", "import "]
    doc_b = ["license ", "copyright "]
    w = token_route_weights(model, [doc_a, doc_b], stride=2, temperature=0.1)
    assert w.shape == (8, 3)
    assert np.allclose(w[0], model.prior) and np.allclose(w[1], model.prior)  # nothing seen yet
    assert np.allclose(w[2:4], route_weights(model, ["lord god "])[0])
    assert np.allclose(w[4:6], route_weights(model, ["lord god israel def "])[0])
    assert np.allclose(w[6:8], model.prior)  # document b starts afresh
    # stride 1 recomputes at every token
    w1 = token_route_weights(model, [doc_a], stride=1)
    assert np.allclose(w1[3], route_weights(model, ["lord god israel "])[0])


def test_fit_errors_and_edge_cases():
    with pytest.raises(BtmError, match=r"k=4 clusters from 3 document\(s\)"):
        fit_clusters(["lord god", "def return", "license"], FitSettings(k=4))
    with pytest.raises(BtmError, match="vocabulary"):
        fit_clusters(["the and", "of the"], FitSettings(k=1))
    with pytest.raises(BtmError, match="k=0"):
        fit_clusters(["lord"], FitSettings(k=0))
    one = fit_clusters(["lord god", "def return", "license"], FitSettings(k=1))
    assert one.k == 1 and np.allclose(route_weights(one, ["lord", ""]), 1.0)
    dup = fit_clusters(["lord god israel"] * 10, FitSettings(k=3))
    assert dup.sizes.tolist() in ([4, 3, 3], [3, 4, 3], [3, 3, 4])


def test_fit_is_deterministic_with_a_seed():
    a = fit_clusters(_texts(), FitSettings(k=3, seed=7, dims=8))
    b = fit_clusters(_texts(), FitSettings(k=3, seed=7, dims=8))
    assert np.array_equal(a.centres, b.centres) and np.array_equal(a.embedder.components, b.embedder.components)


def test_token_route_weights_from_ids_feed_mixing(model):
    """Per-token c-BTM weights from target ids + a decoder, mixed by fairseq_ext.ensemble."""
    from fairseq_ext.ensemble import mix_with_weights
    from fairseq_ext.cluster.routing import token_route_weights_from_ids

    vocab = ["<s>", "<pad>", "</s>", "lord ", "god ", "def ", "return ", "license "]
    decode = lambda ids: "".join(vocab[i] for i in ids if i > 2)  # drops bos/pad/eos  # noqa: E731
    targets = np.array([3, 4, 3, 4, 2, 5, 6, 5, 2])
    doc_starts = np.array([0, 5])
    w = token_route_weights_from_ids(model, targets, doc_starts, decode, stride=2, top_k=2)
    pieces = [[vocab[i] if i > 2 else "" for i in targets[:5]], [vocab[i] if i > 2 else "" for i in targets[5:]]]
    assert np.array_equal(w, token_route_weights(model, pieces, stride=2, top_k=2))
    assert w.shape == (9, 3) and np.allclose(w.sum(1), 1) and ((w > 0).sum(1) <= 2).all()
    rng = np.random.default_rng(0)
    expert_lp = np.log(rng.uniform(0.01, 1.0, size=(3, 9)))  # [N experts, T tokens]
    mixed = mix_with_weights(expert_lp, w)
    assert np.allclose(mixed, np.log((np.exp(expert_lp) * w.T).sum(0)))
    with pytest.raises(ValueError, match="doc_starts"):
        token_route_weights_from_ids(model, targets, np.array([1, 5]), decode)
