"""The lm-evaluation-harness model ``btm`` (fairseq_ext/lm_eval_btm.py), offline.

Real parts: the real prepared data of the small corpus, three real tiny ELM experts (each nudged
towards one domain, so that their posteriors really differ), real lm_eval (Python API and CLI)
on the local tasks in tests/lm_eval_tasks (data built from the development corpus at run time).
Every mixture is recomputed here by hand from single-expert forward passes, with numpy
formulas written out in this file (not fairseq_ext.ensemble).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, REPO, require
from eval_fixtures import DOMAINS, make_expert, tiny_data  # noqa: F401
from launcher.contract.errors import BtmError

pytestmark = pytest.mark.fairseq
TASKS = REPO / "tests" / "lm_eval_tasks"
PAIRS = [("In the beginning", " God created"), ("def main():\n\t", "return 0"),
         ("The party of the first part", " shall"), ("", "Hello world")]


def _lm_eval():
    import importlib.util

    require(importlib.util.find_spec("lm_eval") is not None, "lm-eval is not installed")
    import fairseq_ext.lm_eval_btm as module  # registers the model "btm"

    return module


@pytest.fixture
def forest(tiny_data, tmp_path_factory) -> Path:  # noqa: F811
    """A directory of three <domain>.pt experts with 256 positions."""
    out = tmp_path_factory.getbasetemp() / "harness_forest"
    out.mkdir(exist_ok=True)
    for i, d in enumerate(DOMAINS):
        make_expert(tiny_data, out / f"{d}.pt", domain=d, seed=10 + i, tokens_per_sample=256)
    return out


class Req:  # what lm_eval hands a model: an object with .args
    def __init__(self, *args):
        self.args = args


_MODELS: dict = {}


def experts_in_order(forest: Path) -> list:
    """The forest's ELM models, sorted by expert name (loaded once per test session)."""
    from fairseq_ext.checkpoint import load_model

    paths = sorted(forest.glob("*.pt"))
    for p in paths:
        if p not in _MODELS:
            _MODELS[p] = load_model(p).model
    return [_MODELS[p] for p in paths]


def hand_logprobs(forest: Path, data_dir: Path, context: str, continuation: str, positions: int = 256):
    """Per expert (sorted by name): target log-probs [T] and full rows [T, V] of the document
    </s> + context + continuation, and the number of continuation tokens."""
    import torch

    from fairseq_ext.data_prep import encode_text

    # lm_eval moves a context's trailing whitespace into the continuation (TemplateLM._encode_pair)
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = encode_text(data_dir, context + continuation)
    n_cont = len(whole) - len(encode_text(data_dir, context)) if context else len(whole)
    doc = ([2] + whole)[-(positions + 1):]  # a prompt longer than the window loses its start
    whole = doc[1:]
    targets = torch.tensor(whole)
    lps, fulls = [], []
    for model in experts_in_order(forest):
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([doc[:-1]]))[0][0].float(), -1)
        fulls.append(full.double().numpy())
        lps.append(full.gather(1, targets[:, None])[:, 0].double().numpy())
    return np.stack(lps), np.stack(fulls), n_cont, whole


def hand_weights(lps: np.ndarray, method: str, prior, top_k=None) -> np.ndarray:
    """[N, T] mixture weights written out: uniform / fixed prior / Bayes posterior
    w_j(t) ∝ prior_j * prod_{s<t} p_j(x_s); top-k keeps the k largest and renormalizes."""
    n, t = lps.shape
    prior = np.full(n, 1.0 / n) if prior is None else np.asarray(prior, float) / np.sum(prior)
    if method == "uniform":
        w = np.full((n, t), 1.0 / n)
    elif method == "prior":
        w = np.repeat(prior[:, None], t, axis=1)
    else:
        w = np.empty((n, t))
        for pos in range(t):
            log_evidence = np.log(prior) + lps[:, :pos].sum(axis=1)
            evidence = np.exp(log_evidence - log_evidence.max())  # no underflow on long prompts
            w[:, pos] = evidence / evidence.sum()
    if top_k is not None:
        for pos in range(t):
            drop = np.argsort(-w[:, pos], kind="stable")[top_k:]
            w[drop, pos] = 0.0
            w[:, pos] /= w[:, pos].sum()
    return w


def hand_score(forest, data_dir, context, continuation, method, prior=None, top_k=None):
    lps, fulls, k, whole = hand_logprobs(forest, data_dir, context, continuation)
    w = hand_weights(lps, method, prior, top_k)
    mix = np.log((w * np.exp(lps)).sum(axis=0))
    dist = np.einsum("nt,ntv->tv", w, np.exp(fulls))
    greedy = bool(np.array_equal(dist.argmax(-1)[-k:], np.asarray(whole[-k:])))
    return float(mix[-k:].sum()), greedy


def make_lm(forest, data_dir, **args):
    module = _lm_eval()
    return module.BtmLM(data_dir=str(data_dir), forest=str(forest), **args)


# ----------------------------------------------------------------------------- the math


def test_registered_in_lm_eval_registry():
    module = _lm_eval()
    from lm_eval.api.registry import get_model

    assert get_model("btm") is module.BtmLM


@pytest.mark.parametrize("method,prior,top_k", [
    ("uniform", None, None), ("prior", "0.2:0.5:0.3", None), ("posterior", None, None),
    ("posterior", "0.6:0.3:0.1", None), ("posterior", "0.6:0.3:0.1", 2), ("prior", "0.6:0.3:0.1", 2)])
def test_option_scores_equal_hand_mixtures(tiny_data, forest, method, prior, top_k):  # noqa: F811
    lm = make_lm(forest, tiny_data, method=method, prior=prior, top_k=top_k)
    got = lm.loglikelihood([Req(c, x) for c, x in PAIRS], disable_tqdm=True)
    p = None if prior is None else [float(v) for v in prior.split(":")]
    for (c, x), (ll, greedy) in zip(PAIRS, got):
        want_ll, want_greedy = hand_score(forest, tiny_data, c, x, method, p, top_k)
        assert ll == pytest.approx(want_ll, abs=1e-5), (c, x)
        assert greedy == want_greedy
    if method == "prior" and top_k == 2:  # only the two experts with the highest prior run
        assert lm.mixture.names == ["bible", "code_python"] and len(lm.mixture.models) == 2


def test_one_expert_and_top_k_equal_to_n(tiny_data, forest):  # noqa: F811
    reqs = [Req(c, x) for c, x in PAIRS]
    for method in ("prior", "posterior"):
        full = make_lm(forest, tiny_data, method=method, prior="0.2:0.5:0.3").loglikelihood(reqs, disable_tqdm=True)
        top_n = make_lm(forest, tiny_data, method=method, prior="0.2:0.5:0.3", top_k=3).loglikelihood(
            reqs, disable_tqdm=True)
        assert [ll for ll, _ in top_n] == pytest.approx([ll for ll, _ in full], abs=1e-9)
    one = make_lm(forest, tiny_data, method="expert", expert="legal")
    assert len(one.mixture.models) == 1
    got = one.loglikelihood(reqs, disable_tqdm=True)
    for (c, x), (ll, _) in zip(PAIRS, got):
        lps, _, k, _ = hand_logprobs(forest, tiny_data, c, x)
        assert ll == pytest.approx(lps[2, -k:].sum(), abs=1e-5)  # sorted names: legal is third
    # top-1 by prior = that expert alone, and only it runs
    top1 = make_lm(forest, tiny_data, method="prior", prior="0.1:0.1:0.8", top_k=1)
    assert top1.mixture.names == ["legal"]
    assert [ll for ll, _ in top1.loglikelihood(reqs, disable_tqdm=True)] == pytest.approx(
        [ll for ll, _ in got], abs=1e-9)


def test_parameter_average_equals_averaged_checkpoint(tiny_data, forest, tmp_path):  # noqa: F811
    from fairseq_ext.averaging import average_checkpoints

    paths = sorted(forest.glob("*.pt"))
    average_checkpoints(paths, [0.2, 0.5, 0.3], tmp_path / "avg.pt")
    module = _lm_eval()
    by_file = module.BtmLM(checkpoint=str(tmp_path / "avg.pt"), data_dir=str(tiny_data))
    in_memory = make_lm(forest, tiny_data, method="average", prior="0.2:0.5:0.3")
    assert len(in_memory.mixture.models) == 1
    reqs = [Req(c, x) for c, x in PAIRS]
    a = by_file.loglikelihood(reqs, disable_tqdm=True)
    b = in_memory.loglikelihood(reqs, disable_tqdm=True)
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], abs=1e-6)
    single = [ll for ll, _ in make_lm(forest, tiny_data, method="expert", expert="bible").loglikelihood(
        reqs, disable_tqdm=True)]
    assert [x for x, _ in a] != pytest.approx(single, abs=1e-3)  # really a different model
    in_memory.mixture.close()


def test_rolling_and_generation_equal_hand_computation(tiny_data, forest):  # noqa: F811
    lm = make_lm(forest, tiny_data, method="posterior", prior="0.5:0.25:0.25")
    texts = ["And God said, Let there be light", "import os\nprint(os.getcwd())", ""]
    got = lm.loglikelihood_rolling([Req(t) for t in texts], disable_tqdm=True)
    for text, ll in zip(texts[:2], got):
        lps, _, _, _ = hand_logprobs(forest, tiny_data, "", text)
        w = hand_weights(lps, "posterior", [0.5, 0.25, 0.25])
        assert ll == pytest.approx(np.log((w * np.exp(lps)).sum(0)).sum(), abs=1e-5)
    assert got[2] == 0.0

    # greedy decoding: each new token is the argmax of the hand-mixed next-token distribution
    out = lm.generate_until([Req("In the beginning", {"until": ["\n\n"], "max_gen_toks": 4}),
                             Req("def f(x):", {"until": ["zzz"], "max_gen_toks": 3})], disable_tqdm=True)
    from fairseq_ext.data_prep import decode_ids, encode_text

    import torch

    models = experts_in_order(forest)
    for prompt, text, n, until in (("In the beginning", out[0], 4, "\n\n"), ("def f(x):", out[1], 3, "zzz")):
        ids = encode_text(tiny_data, prompt)
        new = []
        for _ in range(n):
            seq = torch.tensor([[2] + ids + new])
            rows, prefix = [], []
            with torch.no_grad():
                for model in models:
                    lp = torch.log_softmax(model(seq)[0][0].float(), -1).double()
                    rows.append(lp[-1].numpy())
                    prefix.append(lp[:-1].gather(1, torch.tensor(ids + new)[:, None])[:, 0].sum().item())
            w = np.array([0.5, 0.25, 0.25]) * np.exp(np.array(prefix))
            w /= w.sum()
            token = int((w[:, None] * np.exp(np.stack(rows))).sum(0).argmax())
            if token == 2:
                break
            new.append(token)
        hand = decode_ids(tiny_data, new)
        if until in hand:  # lm_eval stops at the first stop sequence and cuts it off
            hand = hand.split(until)[0]
        assert text == hand


def test_bad_model_args_are_clear_errors(tiny_data, forest):  # noqa: F811
    with pytest.raises(BtmError, match="unknown btm model_args"):
        make_lm(forest, tiny_data, mystery_arg=1)
    with pytest.raises(BtmError, match="expert=NAME"):
        make_lm(forest, tiny_data, method="expert", expert="nope")
    with pytest.raises(BtmError, match="top_k needs weights"):
        make_lm(forest, tiny_data, method="uniform", top_k=2)
    with pytest.raises(BtmError, match="3 experts"):
        make_lm(forest, tiny_data, method="prior", prior="0.5:0.5")
    with pytest.raises(BtmError, match="unknown method"):
        make_lm(forest, tiny_data, method="mystery")


# ----------------------------------------------------------------------------- through lm_eval


def test_simple_evaluate_end_to_end(tiny_data, forest):  # noqa: F811
    require(CORPUS.is_dir(), f"development corpus not found at {CORPUS}")
    _lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), metadata={"corpus": str(CORPUS)})
    args = f"forest={forest},method=posterior,prior=0.5:0.3:0.2,data_dir={tiny_data}"
    res = lm_eval.simple_evaluate(model="btm", model_args=args, task_manager=tm, batch_size=4,
                                  tasks=["btm_domain_id", "btm_passage_ppl", "btm_domain_gen"],
                                  limit=3, log_samples=True)
    r = res["results"]
    assert 0.0 <= r["btm_domain_id"]["acc,none"] <= 1.0
    assert r["btm_passage_ppl"]["byte_perplexity,none"] > 1.0
    assert 0.0 <= r["btm_domain_gen"]["exact_match,none"] <= 1.0
    sample = res["samples"]["btm_domain_id"][0]
    assert len(sample["resps"]) == len(sample["arguments"]) == 8  # one option per corpus domain
    for (context, option), resp in zip(sample["arguments"], sample["resps"]):
        want, _ = hand_score(forest, tiny_data, context, option, "posterior", [0.5, 0.3, 0.2])
        assert float(resp[0][0]) == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_cli_runs_lm_eval_with_btm_model(tiny_data, forest, tmp_path):  # noqa: F811
    require(CORPUS.is_dir(), f"development corpus not found at {CORPUS}")
    _lm_eval()
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "fairseq_ext.lm_eval_btm", "run", "--model", "btm",
            "--model_args", f"forest={forest},method=prior,prior=0.2:0.5:0.3,top_k=1,data_dir={tiny_data}",
            "--tasks", "btm_domain_id", "--include_path", str(TASKS), "--limit", "2",
            "--metadata", json.dumps({"corpus": str(CORPUS)}), "--output_path", str(out)]
    proc = subprocess.run(argv, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("results*.json"))
    assert files, proc.stdout[-2000:]
    results = json.loads(files[0].read_text())["results"]["btm_domain_id"]
    assert 0.0 <= results["acc,none"] <= 1.0
