"""Few-shot routing of the ``btm`` harness model (fairseq_ext/lm_eval_btm.py): c-BTM's rule.

routing=prompt: weights from the whole context (the tf-idf + SVD cluster weights for a c-BTM
forest, the domain posterior from the context's likelihood for a domain forest), top k kept,
each option scored as logsumexp over the kept experts of (log w + log p(option | context)).

Real parts: the tiny prepared data, real tiny ELM experts (nudged towards one domain each), a
cluster model really fitted (tf-idf + SVD + balanced k-means) on the small corpus, real lm_eval
on the local tasks. Every weight and score is recomputed here by hand with numpy from
single-expert forward passes (``test_lm_eval_btm.hand_logprobs``) and the fitted model's
centres; the context embedding itself is the fitted model's ``embed`` (its exactness is tested
in tests/test_cluster_model.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, require
from eval_fixtures import DOMAINS, make_expert, tiny_data  # noqa: F401
from test_lm_eval_btm import TASKS, Req, _lm_eval, forest, hand_logprobs  # noqa: F401
from launcher.contract.errors import BtmError

pytestmark = pytest.mark.fairseq
CONTEXTS = ["In the beginning God created the heaven and the earth. And the earth was without form",
            "def main():\n    import os\n    return os.path.join(a, b)",
            "The Licensor grants You a worldwide, royalty-free, non-exclusive license to the Licensed Material",
            ""]
OPTIONS = [" bible", " code", " law"]


@pytest.fixture
def cbtm_run(tiny_data, small_corpus, tmp_path_factory) -> Path:  # noqa: F811
    """A c-BTM run dir: clusters/model fitted on the small corpus (k=3), experts cluster_<i>
    (each nudged towards the domain whose first train document lands in cluster i), forest.json."""
    run = tmp_path_factory.getbasetemp() / "harness_cbtm"
    if (run / "forest.json").exists():
        return run
    from fairseq_ext.cluster import FitSettings, fit_corpus, save_model
    from launcher.contract.corpus import find_sources, iter_documents
    from launcher.contract.forest import editing

    model = fit_corpus(small_corpus, FitSettings(k=3, seed=0, dims=20))
    save_model(model, run / "clusters" / "model")
    first = {s.domain: next(iter_documents(s.path)) for s in find_sources(small_corpus, splits=["train"])}
    free = list(range(model.k))
    domain_of = {}
    for d in DOMAINS:
        h = model.embed([first[d]])[0]
        near = [int(c) for c in np.argsort(((model.centres - h) ** 2).sum(1)) if c in free][0]
        free.remove(near)
        domain_of[near] = d
    with editing(run / "forest.json", run="harness_cbtm") as f:
        for i in range(model.k):
            path = make_expert(tiny_data, run / "experts" / f"cluster_{i}.pt", domain=domain_of[i],
                               seed=20 + i, tokens_per_sample=256)
            f.add(f"cluster_{i}", [f"cluster_{i}"], path)
    return run


def cluster_model(run: Path):
    from fairseq_ext.cluster import load_model

    return load_model(run / "clusters" / "model")


def experts_dir(run: Path) -> Path:
    return run / "experts"


def hand_cluster_weights(run: Path, text: str, temperature: float, top_k=None) -> np.ndarray:
    """softmax(-||h - c_j||^2 / T) over the fitted centres, written out; an empty text (no
    known term) gets the cluster sizes; top-k keeps the k largest (ties: lower index)."""
    model = cluster_model(run)
    h = model.embed([text])[0].astype(np.float64)
    if not np.any(h):
        w = model.sizes / model.sizes.sum()
    else:
        d2 = np.array([np.sum((h - c.astype(np.float64)) ** 2) for c in model.centres])
        e = np.exp(-(d2 - d2.min()) / temperature)
        w = e / e.sum()
    if top_k is not None:
        w = w.copy()
        w[np.argsort(-w, kind="stable")[top_k:]] = 0.0
        w /= w.sum()
    return w


def hand_posterior_weights(lps: np.ndarray, n_cont: int, prior, top_k=None) -> np.ndarray:
    """P(D=j | context) ∝ prior_j * p_j(context), from the context tokens' log-probs."""
    n = lps.shape[0]
    prior = np.full(n, 1.0 / n) if prior is None else np.asarray(prior, float) / np.sum(prior)
    log_post = np.log(prior) + lps[:, :lps.shape[1] - n_cont].sum(axis=1)
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    if top_k is not None:
        w[np.argsort(-w, kind="stable")[top_k:]] = 0.0
        w /= w.sum()
    return w


def hand_option_score(w: np.ndarray, lps: np.ndarray, n_cont: int) -> float:
    """log sum_j w_j * p_j(option | context) over the experts with w_j > 0."""
    kept = w > 0
    return float(np.log(np.sum(w[kept] * np.exp(lps[kept, -n_cont:].sum(axis=1)))))


def make_cbtm_lm(run, tiny_data, **args):  # noqa: F811
    return _lm_eval().BtmLM(forest=str(run), data_dir=str(tiny_data), method="cluster", **args)


REQS = [(c, o) for c in CONTEXTS for o in OPTIONS]


# ----------------------------------------------------------------------------- the weights

@pytest.mark.parametrize("temperature,top_k", [(0.1, None), (0.5, None), (0.1, 2), (1.0, 1)])
def test_cluster_prompt_weights_are_softmax_of_squared_distances(tiny_data, cbtm_run, temperature, top_k):  # noqa: F811
    lm = make_cbtm_lm(cbtm_run, tiny_data, routing="prompt", temperature=temperature, top_k=top_k)
    got = np.exp(lm._prompt_log_weights([[2]] * len(CONTEXTS), CONTEXTS))
    for text, row in zip(CONTEXTS, got):
        assert row == pytest.approx(hand_cluster_weights(cbtm_run, text, temperature, top_k), abs=1e-9)
    assert lm.forward_sequences == 0  # cluster weights come from the text alone
    # the prompts really are routed apart (not all to one cluster)
    assert len({int(np.argmax(r)) for r in got[:3]}) == 3


# ----------------------------------------------------------------------------- option scores

@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_cluster_prompt_option_scores_equal_hand_mixture(tiny_data, cbtm_run, top_k):  # noqa: F811
    lm = make_cbtm_lm(cbtm_run, tiny_data, routing="prompt", top_k=top_k)
    got = lm.loglikelihood([Req(c, o) for c, o in REQS], disable_tqdm=True)
    for (c, o), (ll, _) in zip(REQS, got):
        lps, _, n_cont, _ = hand_logprobs(experts_dir(cbtm_run), tiny_data, c, o)
        w = hand_cluster_weights(cbtm_run, c, 0.1, top_k)
        assert ll == pytest.approx(hand_option_score(w, lps, n_cont), abs=1e-5), (c, o)
    # only the kept experts score the options: k passes per request
    assert lm.forward_sequences == len(REQS) * (top_k or 3)


@pytest.mark.parametrize("prior,top_k", [(None, None), ("0.6:0.3:0.1", None), ("0.6:0.3:0.1", 1), (None, 2)])
def test_posterior_prompt_option_scores_equal_hand_mixture(tiny_data, forest, prior, top_k):  # noqa: F811
    lm = _lm_eval().BtmLM(forest=str(forest), data_dir=str(tiny_data), method="posterior", routing="prompt",
                          prior=prior, top_k=top_k)
    got = lm.loglikelihood([Req(c, o) for c, o in REQS], disable_tqdm=True)
    p = None if prior is None else [float(v) for v in prior.split(":")]
    for (c, o), (ll, _) in zip(REQS, got):
        lps, _, n_cont, _ = hand_logprobs(forest, tiny_data, c, o)
        w = hand_posterior_weights(lps, n_cont, p, top_k)
        assert ll == pytest.approx(hand_option_score(w, lps, n_cont), abs=1e-5), (c, o)
    # every expert reads each distinct non-empty context once; the kept experts score the options
    assert lm.forward_sequences == 3 * (len(CONTEXTS) - 1) + len(REQS) * (top_k or 3)


def test_prompt_top_k_equal_to_n_is_the_full_prompt_mixture(tiny_data, forest, cbtm_run):  # noqa: F811
    reqs = [Req(c, o) for c, o in REQS]
    full = make_cbtm_lm(cbtm_run, tiny_data, routing="prompt").loglikelihood(reqs, disable_tqdm=True)
    top_n = make_cbtm_lm(cbtm_run, tiny_data, routing="prompt", top_k=3).loglikelihood(reqs, disable_tqdm=True)
    assert [ll for ll, _ in top_n] == pytest.approx([ll for ll, _ in full], abs=1e-9)
    module = _lm_eval()
    args = dict(forest=str(forest), data_dir=str(tiny_data), method="posterior", prior="0.2:0.5:0.3")
    full = module.BtmLM(routing="prompt", **args).loglikelihood(reqs, disable_tqdm=True)
    top_n = module.BtmLM(routing="prompt", top_k=3, **args).loglikelihood(reqs, disable_tqdm=True)
    assert [ll for ll, _ in top_n] == pytest.approx([ll for ll, _ in full], abs=1e-9)
    # Bayes: with every expert kept, the prompt-routed sequence mixture is exactly the updating
    # per-token posterior mixture (token routing) of the same continuation
    token = module.BtmLM(routing="token", **args).loglikelihood(reqs, disable_tqdm=True)
    assert [ll for ll, _ in full] == pytest.approx([ll for ll, _ in token], abs=1e-6)
    assert [g for _, g in full] == [g for _, g in token]


def test_cluster_token_routing_equals_hand_per_block_weights(tiny_data, cbtm_run):  # noqa: F811
    from fairseq_ext.data_prep import decode_ids

    stride = 4
    lm = make_cbtm_lm(cbtm_run, tiny_data, routing="token", top_k=2, stride=stride)
    pairs = [(c, o) for c in CONTEXTS[:2] for o in OPTIONS[:2]]
    got = lm.loglikelihood([Req(c, o) for c, o in pairs], disable_tqdm=True)
    for (c, o), (ll, _) in zip(pairs, got):
        lps, _, n_cont, whole = hand_logprobs(experts_dir(cbtm_run), tiny_data, c, o)
        total = 0.0
        for t in range(len(whole) - n_cont, len(whole)):  # weights from the text before t's block
            w = hand_cluster_weights(cbtm_run, decode_ids(tiny_data, whole[:t - t % stride]), 0.1, 2)
            total += np.log(np.sum(w * np.exp(lps[:, t])))
        assert ll == pytest.approx(total, abs=1e-5), (c, o)


def test_prompt_routed_generation_follows_the_kept_expert(tiny_data, cbtm_run):  # noqa: F811
    """top-1 prompt routing generates exactly what the one kept expert generates alone."""
    module = _lm_eval()
    lm = make_cbtm_lm(cbtm_run, tiny_data, routing="prompt", top_k=1)
    reqs = [Req(c, {"until": ["\n\n"], "max_gen_toks": 4}) for c in CONTEXTS[:3]]
    out = lm.generate_until(reqs, disable_tqdm=True)
    for c, text in zip(CONTEXTS[:3], out):
        chosen = int(np.argmax(hand_cluster_weights(cbtm_run, c, 0.1)))
        alone = module.BtmLM(checkpoint=str(experts_dir(cbtm_run) / f"cluster_{chosen}.pt"),
                             data_dir=str(tiny_data))
        assert alone.generate_until([Req(c, {"until": ["\n\n"], "max_gen_toks": 4})], disable_tqdm=True) == [text]


def test_bad_routing_args_are_clear_errors(tiny_data, forest, cbtm_run, tmp_path):  # noqa: F811
    with pytest.raises(BtmError, match="routing=prompt takes the weights from the prompt"):
        _lm_eval().BtmLM(forest=str(forest), data_dir=str(tiny_data), method="prior", routing="prompt")
    with pytest.raises(BtmError, match="unknown routing"):
        make_cbtm_lm(cbtm_run, tiny_data, routing="sideways")
    with pytest.raises(BtmError, match="not a fitted cluster model"):
        _lm_eval().BtmLM(forest=str(forest), data_dir=str(tiny_data), method="cluster")
    with pytest.raises(BtmError, match="lacks cluster_0"):
        _lm_eval().BtmLM(forest=str(forest), data_dir=str(tiny_data), method="cluster",
                         clusters=str(cbtm_run / "clusters" / "model"))
    with pytest.raises(BtmError, match="prior=... does not apply"):
        make_cbtm_lm(cbtm_run, tiny_data, prior="0.2:0.3:0.5")


# ----------------------------------------------------------------------------- through lm_eval

def test_cbtm_forest_end_to_end_through_a_local_harness_task(tiny_data, cbtm_run):  # noqa: F811
    """simple_evaluate with 8 demonstrations drawn by lm_eval's few-shot sampler (seeded)."""
    require(CORPUS.is_dir(), f"development corpus not found at {CORPUS}")
    _lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), metadata={"corpus": str(CORPUS)})
    args = f"forest={cbtm_run},method=cluster,routing=prompt,top_k=2,temperature=0.1,data_dir={tiny_data}"
    res = lm_eval.simple_evaluate(model="btm", model_args=args, task_manager=tm, batch_size=4,
                                  tasks=["btm_domain_fewshot"], num_fewshot=8, fewshot_random_seed=3,
                                  limit=2, log_samples=True)
    assert 0.0 <= res["results"]["btm_domain_fewshot"]["acc,none"] <= 1.0
    sample = res["samples"]["btm_domain_fewshot"][0]
    context = sample["arguments"][0][0]
    assert context.count("\nDomain: ") == 8  # the 8 demonstrations are in the prompt
    for (ctx, option), resp in zip(sample["arguments"], sample["resps"]):
        lps, _, n_cont, _ = hand_logprobs(experts_dir(cbtm_run), tiny_data, ctx, option)
        want = hand_option_score(hand_cluster_weights(cbtm_run, ctx, 0.1, 2), lps, n_cont)
        assert float(resp[0][0]) == pytest.approx(want, abs=1e-5)
