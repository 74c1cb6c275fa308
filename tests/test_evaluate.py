"""Forest evaluation end to end (fairseq_ext/evaluate.py through launcher/stages/evaluation.py,
`btm eval`, `btm average`)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import run_btm
from eval_fixtures import DOMAINS, make_expert, tiny_data, tiny_experts  # noqa: F401
from launcher.contract.errors import BtmError
from launcher.contract.results import KEY_COLUMNS, read_results

pytestmark = pytest.mark.fairseq


def settings(**over):
    from fairseq_ext.evaluate import EvalSettings
    from fairseq_ext.scoring import ContextSettings

    base = dict(context=ContextSettings(tokens_per_sample=64), top_k=(1, 2), device="cpu")
    base.update(over)
    return EvalSettings(**base)


def evaluate_forest(run, experts, domains, *, data_dir, settings):
    """The launcher's path: model code returns rows, the launcher files them in RUN/results/."""
    from launcher.contract.layout import RunLayout
    from launcher.stages.evaluation import evaluate_mixes

    return evaluate_mixes(RunLayout(run), experts, domains, settings, data_dir=data_dir)


def by_method(rows, domain):
    sub = rows[rows.eval_domain == domain]
    return {(m, int(k)): r for (m, k), r in zip(zip(sub.method, sub.k), sub.itertuples())}


def test_forest_rows_are_correct_and_a_rerun_hits_the_cache(tiny_data, tiny_experts, tmp_path, monkeypatch):
    from fairseq_ext import ensemble
    from fairseq_ext.priors import PriorSettings
    from fairseq_ext.scoring import score_split

    run = tmp_path / "run"
    rows = evaluate_forest(run, tiny_experts, ["legal", "bible"], data_dir=tiny_data, settings=settings())
    assert len(rows) == 2 * (3 + 4 + 2)
    table = read_results(run)
    assert len(table) == len(rows) and not table.duplicated(subset=KEY_COLUMNS).any()
    legal = by_method(rows, "legal")

    # Single experts: exactly the cached per-token scores; the legal expert is best on legal.
    s = score_split(tiny_experts["legal"], tiny_data, "legal", "test", cache_dir=run / "scores",
                    context=settings().context)
    assert s.forward_passes == 0  # cached by the evaluation
    assert legal["expert:legal", 1].nll == pytest.approx(s.nll, rel=1e-12)
    assert legal["expert:legal", 1].tokens == s.tokens and legal["expert:legal", 1].prior == "none"
    assert legal["expert:legal", 1].expert_forward_passes == math.ceil(s.tokens / 64) or \
        legal["expert:legal", 1].expert_forward_passes > 0
    expert_nll = {n: legal[f"expert:{n}", 1].nll for n in DOMAINS}
    assert min(expert_nll, key=expert_nll.get) == "legal"

    # Ensembles: recomputed from the cached scores with the cached prior.
    lp = np.stack([score_split(p, tiny_data, "legal", "test", cache_dir=run / "scores",
                               context=settings().context).logprobs for p in tiny_experts.values()])
    prior_files = sorted((run / "priors").glob("legal.*.json"))
    assert len(prior_files) == 1
    import json
    prior = np.array(json.loads(prior_files[0].read_text())["prior"])
    assert np.argmax(prior) == DOMAINS.index("legal")
    for method, rule in [("ensemble_uniform", "uniform"), ("ensemble_prior", "prior"),
                         ("ensemble_posterior", "posterior"), ("ensemble_prev_token", "prev_token")]:
        expected = ensemble.nll(ensemble.ensemble_logprobs(lp, s.doc_starts, rule, prior))
        assert legal[method, 3].nll == pytest.approx(expected, rel=1e-12)
    # The default prior: T chosen on valid among the candidates, each candidate's nll recorded.
    saved = json.loads(prior_files[0].read_text())
    assert legal["ensemble_prior", 3].prior == PriorSettings().describe(saved["temperature"])
    assert legal["ensemble_prior", 3].prior.endswith(f",T={saved['temperature']:g}(chosen)")
    assert set(saved["heldout_nll_by_temperature"]) == {"1", "3", "10", "30", "100"}
    assert legal["ensemble_prior", 3].nll <= float(prior @ np.array(list(expert_nll.values()))) + 1e-12
    # The posterior ensemble beats the uniform one on an in-domain split.
    assert legal["ensemble_posterior", 3].nll < legal["ensemble_uniform", 3].nll
    # top-1 with the cached prior is the legal expert alone.
    assert legal["topk_prior", 1].nll == pytest.approx(expert_nll["legal"], rel=1e-12)
    assert legal["ensemble_prior", 3].expert_forward_passes == sum(
        legal[f"expert:{n}", 1].expert_forward_passes for n in DOMAINS)

    # Re-running the same evaluation scores nothing and replaces the rows (no duplicates).
    again = evaluate_forest(run, tiny_experts, ["legal", "bible"], data_dir=tiny_data, settings=settings())
    assert (again.expert_forward_passes == 0).all()
    np.testing.assert_allclose(again.nll.to_numpy(), rows.nll.to_numpy(), rtol=1e-12)
    assert len(read_results(run)) == len(rows)

    # New prior settings and k cost only mixing (held-out and test scores are cached); with
    # nothing to score, the checkpoints are not even opened for the compatibility check.
    import fairseq_ext.merging.compat

    def no_loading(paths, **kw):
        raise AssertionError("compatibility check ran although every score was cached")

    monkeypatch.setattr(fairseq_ext.merging.compat, "check_compatible", no_loading)
    new = evaluate_forest(run, tiny_experts, ["legal"], data_dir=tiny_data,
                          settings=settings(prior=PriorSettings(alpha=0.5, batch_docs=1), top_k=(3,),
                                            methods=("ensemble_posterior", "topk_prior")))
    assert (new.expert_forward_passes == 0).all() and len(new) == 2
    assert len(read_results(run)) == len(rows) + 2
    assert len(list((run / "priors").glob("legal.*.json"))) == 2


def test_prescore_fills_the_cache_the_evaluation_reads(tiny_data, tiny_experts, tmp_path):
    from fairseq_ext.evaluate import EvalDirs, prescore

    run = tmp_path / "run"
    for path in tiny_experts.values():  # what the launcher's score stage does, one unit each
        scores = prescore(path, "bible", EvalDirs(data=tiny_data, scores=run / "scores", priors=run / "priors"),
                          settings())
        assert [s.forward_passes > 0 for s in scores] == [True, True]
    rows = evaluate_forest(run, tiny_experts, ["bible"], data_dir=tiny_data, settings=settings())
    assert (rows.expert_forward_passes == 0).all()


def test_sparse_top_k_scores_only_the_selected_experts(tiny_data, tiny_experts, tmp_path):

    run = tmp_path / "run"
    # Estimate and cache the prior first (held-out split only).
    evaluate_forest(run, tiny_experts, ["legal"], data_dir=tiny_data,
                    settings=settings(methods=("ensemble_prior",), split="valid"))
    assert not list((run / "scores").glob("legal.test.*"))
    rows = evaluate_forest(run, tiny_experts, ["legal"], data_dir=tiny_data,
                           settings=settings(methods=("topk_prior",), top_k=(1,)))
    test_files = list((run / "scores").glob("legal.test.*"))
    assert len(test_files) == 1  # one expert scored the test split, not three
    row = rows.iloc[0]
    assert row.method == "topk_prior" and row.k == 1
    n_tokens = int(row.tokens)
    assert row.expert_forward_passes > 0
    # k = 2 scores one more expert; its row counts the passes of both experts it mixes.
    rows2 = evaluate_forest(run, tiny_experts, ["legal"], data_dir=tiny_data,
                            settings=settings(methods=("topk_prior",), top_k=(2,)))
    assert len(list((run / "scores").glob("legal.test.*"))) == 2
    assert 0 < rows2.iloc[0].expert_forward_passes <= 2 * row.expert_forward_passes
    assert rows2.iloc[0].tokens == n_tokens


def test_mismatched_experts_fail_before_any_scoring(tiny_data, tiny_experts, tmp_path):
    import torch
    from fairseq.data import Dictionary

    from fairseq_ext.checkpoint import load_checkpoint, save_checkpoint

    wide = make_expert(tiny_data, tmp_path / "wide.pt", domain=None, tokens_per_sample=96)
    run = tmp_path / "run"
    with pytest.raises(BtmError, match="cannot form one forest.*positions"):
        evaluate_forest(run, {"legal": tiny_experts["legal"], "wide": wide}, ["legal"], data_dir=tiny_data,
                        settings=settings())
    # Another dictionary: same shapes, one symbol renamed.
    state = load_checkpoint(tiny_experts["bible"])
    state["extra_state"]["btm"]["dictionary"]["symbols"][5] = "<renamed>"
    save_checkpoint(state, tmp_path / "otherdict.pt")
    with pytest.raises(BtmError, match="cannot form one forest.*different dictionaries"):
        evaluate_forest(run, {"legal": tiny_experts["legal"], "other": tmp_path / "otherdict.pt"}, ["legal"],
                        data_dir=tiny_data, settings=settings())
    with pytest.raises(BtmError, match="checkpoint .*nope.pt does not exist"):
        evaluate_forest(run, {"legal": tmp_path / "nope.pt"}, ["legal"], data_dir=tiny_data, settings=settings())
    assert not (run / "scores").exists() and not (run / "results").exists()


def test_btm_eval_and_average_cli(tiny_data, tiny_experts, tmp_path, capsys):
    from launcher.cli import main

    run = tmp_path / "run"
    experts = ",".join(f"{n}={p}" for n, p in tiny_experts.items())
    common = ["--experts", experts, "--data", str(tiny_data), "--tokens-per-sample", "64", "--device", "cpu"]
    proc = run_btm("eval", run, *common, "--domains", "legal", "--methods", "expert,ensemble_posterior,topk_prior",
                   "--top-k", "1,2", check=True)
    assert "ensemble_posterior" in proc.stdout and "results.csv" in proc.stdout
    table = read_results(run)
    assert sorted(table.method) == sorted(["expert:bible", "expert:code_python", "expert:legal",
                                           "ensemble_posterior", "topk_prior", "topk_prior"])
    expert_ppl = dict(zip(table.method, table.ppl))

    proc = run_btm("average", run, *common, "--method", "posterior", "--target-domain", "legal", check=True)
    assert "average:" in proc.stdout
    # The same verb in-process (the subprocess above proves the entry point; this is faster).
    for method in ("uniform", "argmax"):
        assert main(["average", str(run), *common, "--method", method, "--target-domain", "legal"]) == 0
    table = read_results(run)
    avg = {m: r for m, r in zip(table.method, table.itertuples()) if m.startswith("average_")}
    assert set(avg) == {"average_uniform", "average_argmax", "average_posterior"}
    for name in ("uniform", "argmax.legal", "posterior.legal"):
        out = run / "averages" / name
        assert (out / "checkpoint.pt").is_file() and (out / "model.safetensors").is_file()
    # argmax = the legal expert's own parameters, so the same perplexity.
    assert avg["average_argmax"].k == 1
    assert avg["average_argmax"].ppl == pytest.approx(expert_ppl["expert:legal"], rel=1e-6)
    assert avg["average_posterior"].k == 3 and "target=legal" in avg["average_posterior"].prior
    # Re-running an average reuses it and its scores.
    before = (run / "averages" / "posterior.legal" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["average", str(run), *common, "--method", "posterior", "--target-domain", "legal"]) == 0
    assert (run / "averages" / "posterior.legal" / "checkpoint.pt").stat().st_mtime_ns == before
    table = read_results(run)
    assert int(table[table.method == "average_posterior"].expert_forward_passes.iloc[0]) == 0

    for argv, message in [
        (["eval", str(run), "--experts", "legal", "--data", str(tiny_data)],
         "btm: error: --experts: expected name=path, got 'legal'"),
        (["eval", str(run), *common, "--domains", "legal", "--methods", "magic"],
         "btm: error: unknown evaluation method 'magic'"),
        (["average", str(run), *common, "--method", "argmax"], "btm: error: average method 'argmax' needs"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_trained_experts_end_to_end(tiny_data, tmp_path):
    """Two tiny experts really trained (a few dozen updates each) with the model engineer's trainer."""
    from fairseq_ext.train import TrainSpec, train_lm

    experts = {}
    for d in ("legal", "bible"):
        result = train_lm(TrainSpec(data_dir=str(tiny_data), domains=[d], save_dir=str(tmp_path / d),
                                    preset="tiny", max_updates=24, save_interval_updates=24, device="cpu",
                                    tokens_per_batch=512, valid_max_tokens=1000))
        experts[d] = result.checkpoint_last
    run = tmp_path / "run"
    rows = evaluate_forest(run, experts, ["legal", "bible"], data_dir=tiny_data, settings=settings(
        context=__import__("fairseq_ext.scoring", fromlist=["x"]).ContextSettings()))
    for domain in ("legal", "bible"):
        r = by_method(rows, domain)
        assert r[f"expert:{domain}", 1].nll < r[f"expert:{'bible' if domain == 'legal' else 'legal'}", 1].nll
        assert r["ensemble_posterior", 2].nll <= max(r["expert:legal", 1].nll, r["expert:bible", 1].nll)
    again = evaluate_forest(run, experts, ["legal", "bible"], data_dir=tiny_data, settings=settings(
        context=__import__("fairseq_ext.scoring", fromlist=["x"]).ContextSettings()))
    assert (again.expert_forward_passes == 0).all()


def test_btm_eval_reads_forest_json_and_refuses_changed_checkpoints(tiny_data, tiny_experts, tmp_path, capsys):
    import shutil

    from launcher.cli import main
    from launcher.contract.forest import Forest

    run = tmp_path / "run"
    run.mkdir()
    forest = Forest(run="run", path=run / "forest.json")
    for name, path in tiny_experts.items():
        forest.add(name, [name], path)
    forest.save()
    argv = ["eval", str(run), "--data", str(tiny_data), "--domains", "legal", "--methods", "ensemble_uniform",
            "--tokens-per-sample", "64", "--device", "cpu"]
    assert main(argv) == 0
    table = read_results(run)
    assert table.method.tolist() == ["ensemble_uniform"] and table.k.tolist() == [3]

    copy = run / "extra.pt"
    shutil.copy(tiny_experts["bible"], copy)
    forest.add("extra", ["bible"], copy)
    forest.save()
    copy.write_bytes(copy.read_bytes()[:-10] + b"0123456789")
    assert main(argv) == 2
    assert "changed since merge for expert(s) extra" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "empty"), "--data", str(tiny_data), "--domains", "legal"]) == 2
    assert "no forest manifest" in capsys.readouterr().err


def test_btm_eval_defaults_to_the_run_configs_eval_domains(tmp_path):
    """Not the data manifest's domains: a run with a random-split baseline lists its training
    shards (random0, ...) there, and scoring every expert on them costs a full pass each."""
    from launcher.commands.eval import _config_eval_domains
    from launcher.contract.errors import BtmError
    assert _config_eval_domains(tmp_path) is None
    (tmp_path / "config.yaml").write_text("domains:\n  train: [legal, bible]\n  eval: [legal, quotes]\n")
    assert _config_eval_domains(tmp_path) == ["legal", "quotes"]
    (tmp_path / "config.yaml").write_text("domains: [unclosed\n")
    with pytest.raises(BtmError, match="config.yaml"):
        _config_eval_domains(tmp_path)


def test_btm_eval_produces_cbtm_cluster_rows(tiny_data, tiny_experts, tmp_path):
    """`btm eval` computes c-BTM rows with the same launcher function as the eval stage."""
    from fairseq_ext import ensemble
    from fairseq_ext.cluster import FitSettings, fit_clusters, save_model
    from fairseq_ext.cluster.routing import token_route_weights_from_ids
    from fairseq_ext.data_prep import decode_ids
    from fairseq_ext.priors import stack_scores
    from fairseq_ext.scoring import ContextSettings, score_split
    from launcher.cli import main

    rng = np.random.default_rng(0)
    words = ["lord god israel unto thee thou shalt", "def return import class self lambda",
             "license copyright warranty liability software"]
    texts = [" ".join(rng.choice(w.split(), size=20)) for w in words for _ in range(8)]
    run = tmp_path / "run"
    save_model(fit_clusters(texts, FitSettings(k=3, seed=0, dims=4)), run / "clusters" / "model")
    clusters = {f"cluster_{i}": path for i, path in enumerate(tiny_experts.values())}
    experts = ",".join(f"{n}={p}" for n, p in clusters.items())
    assert main(["eval", str(run), "--experts", experts, "--data", str(tiny_data), "--domains", "legal",
                 "--methods", "cbtm_cluster", "--top-k", "1,3", "--tokens-per-sample", "64",
                 "--device", "cpu"]) == 0
    table = read_results(run)
    assert table.method.tolist() == ["cbtm_cluster", "cbtm_cluster"] and table.k.tolist() == [1, 3]
    assert table.n_clusters.tolist() == [3, 3] and (table.eval_domain == "legal").all()
    # k=3: every cluster expert, mixed with the routing weights of the text before each block.
    from fairseq_ext.cluster import load_model

    scores = [score_split(p, tiny_data, "legal", "test", cache_dir=run / "scores",
                          context=ContextSettings(tokens_per_sample=64)) for p in clusters.values()]
    lp, starts = stack_scores(scores)
    weights = token_route_weights_from_ids(load_model(run / "clusters" / "model"), scores[0].targets, starts,
                                           lambda ids: decode_ids(tiny_data, ids), top_k=3)
    assert table.nll[1] == pytest.approx(ensemble.nll(ensemble.mix_with_weights(lp, weights)), rel=1e-12)
    assert (table.expert_forward_passes[1] > 0) and table.routing[1].startswith("tfidf-svd top3")


def test_eval_stage_files_every_method_and_baseline(tiny_data, tiny_experts, tmp_path, monkeypatch):
    """The eval stage (launcher/stages/eval.py): forest from forest.json, the dense
    and random-split baselines from the run's model dirs, no scratch run directory."""
    import shutil
    from types import SimpleNamespace

    from launcher.contract.forest import Forest
    from launcher.contract.layout import RunLayout, random_split_name
    from dataclasses import asdict

    from launcher.stages import eval as eval_stage
    from launcher.stages.base import Ctx, Unit

    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    layout.data.symlink_to(tiny_data, target_is_directory=True)
    forest = Forest(run="run", path=layout.forest)
    for i, (name, path) in enumerate(tiny_experts.items()):
        for model in (name, random_split_name(i)):
            layout.model_dir(model).mkdir(parents=True)
            shutil.copy(path, layout.checkpoint(model))
        forest.add(name, [name], layout.checkpoint(name))
    forest.save()
    layout.model_dir("dense").mkdir()
    shutil.copy(tiny_experts["legal"], layout.checkpoint("dense"))
    params = eval_stage.EvalParams(methods=["experts", "ensemble_uniform", "topk_prior"], top_k=2, split="test",
                        baselines=["dense", "random_split"], domains=["legal"], experts=list(tiny_experts),
                        run="tiny")
    config = SimpleNamespace(name="tiny", expert_names=list(tiny_experts))
    monkeypatch.setenv("BTM_DEVICE", "cpu")
    eval_stage.eval_run(Ctx(layout.root, config, Unit(None, asdict(params)), eval_stage.STAGE))
    table = read_results(layout.root)
    got = dict(zip(zip(table.method, table.k), table.nll))
    assert set(got) == {*((f"expert:{n}", 1) for n in tiny_experts), ("ensemble_uniform", 3), ("topk_prior", 2),
                        ("dense", 1), ("random_split", 3)}
    assert (table.run == "tiny").all()
    # The random-split experts are copies of the forest's: same uniform ensemble, no scratch dir.
    assert got["random_split", 3] == pytest.approx(got["ensemble_uniform", 3], rel=1e-12)
    assert got["dense", 1] == pytest.approx(got["expert:legal", 1], rel=1e-12)
    assert not (layout.root / "baselines").exists()


def test_btm_eval_block_end_prior_with_temperatures_cli(tiny_data, tiny_experts, tmp_path):
    import json

    from fairseq_ext import ensemble
    from fairseq_ext.evaluate import EvalDirs, EvalSettings, Scorer
    from fairseq_ext.priors import stack_scores
    from fairseq_ext.scoring import ContextSettings

    run = tmp_path / "run"
    experts = ",".join(f"{n}={p}" for n, p in tiny_experts.items())
    run_btm("eval", run, "--experts", experts, "--data", tiny_data, "--tokens-per-sample", "64", "--domains", "legal",
            "--methods", "ensemble_prior", "--prior-estimator", "block_end", "--prior-block-tokens", "32",
            "--prior-temperature", "1", "--prior-temperature", "8", check=True)
    (prior_file,) = (run / "priors").glob("legal.*.json")
    saved = json.loads(prior_file.read_text())
    assert saved["estimator"] == "block_end" and saved["key"]["settings"]["temperatures"] == [1.0, 8.0]
    # The same prior from the cached valid scores, by the definition.
    dirs = EvalDirs(data=tiny_data, scores=run / "scores", priors=tmp_path / "unused")
    scorer = Scorer(dirs, EvalSettings(context=ContextSettings(tokens_per_sample=64)))
    lp, starts = stack_scores([scorer(p, "legal", "valid") for p in tiny_experts.values()])
    untempered = ensemble.estimate_prior_block_end(lp, 32)
    chosen, nlls = ensemble.choose_temperature(lp, starts, untempered, (1.0, 8.0))
    assert saved["temperature"] == chosen
    assert saved["prior"] == pytest.approx(ensemble.temper_prior(untempered, chosen).tolist(), rel=1e-9)
    label = read_results(run).prior.iloc[0]
    assert label == (f"block_end(alpha=0.3,batches=all,batch_blocks=2,block_tokens=32,split=valid),"
                     f"T={chosen:g}(chosen)")
    bad = run_btm("eval", run, "--experts", experts, "--data", tiny_data, "--domains", "legal",
                  "--methods", "ensemble_prior", "--prior-temperature", "-1")
    assert bad.returncode == 2 and "positive finite numbers, got -1.0" in bad.stderr
