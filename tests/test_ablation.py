"""Expert removal (fairseq_ext/ablation.py, `btm forest ablate`) on real tiny experts' cached scores."""
from __future__ import annotations

import math
import shutil
import textwrap

import numpy as np
import pandas as pd
import pytest

from conftest import run_btm
from eval_fixtures import DOMAINS, tiny_data, tiny_experts  # noqa: F401
from launcher.contract.errors import BtmError


def _dirs(root, data):
    from fairseq_ext.evaluate import EvalDirs

    return EvalDirs(data=data, scores=root / "scores", priors=root / "priors")


def _prescore(experts, dirs, settings):
    from fairseq_ext.evaluate import prescore

    for path in experts.values():
        for d in DOMAINS:
            prescore(path, d, dirs, settings)


def test_removal_re_estimates_the_prior_and_re_mixes_the_cached_scores(tiny_data, tiny_experts, tmp_path):
    from fairseq_ext import ensemble
    from fairseq_ext.ablation import ablate_experts
    from fairseq_ext.evaluate import EvalSettings, Scorer
    from fairseq_ext.priors import PriorSettings, stack_scores

    dirs = _dirs(tmp_path, tiny_data)
    settings = EvalSettings(split="test", prior=PriorSettings(temperatures=(1.0, 4.0)))
    _prescore(tiny_experts, dirs, settings)
    rows = ablate_experts(tiny_experts, DOMAINS, dirs, settings=settings, method="ensemble_posterior")
    assert len(rows) == len(tiny_experts) * len(DOMAINS)
    assert not list((tmp_path / "priors").glob("*.json"))  # the subsets' priors are not cached

    # Recompute one cell by hand: remove `legal`, evaluate on `bible`.
    scorer = Scorer(dirs, settings)
    keep = [n for n in tiny_experts if n != "legal"]
    held_lp, held_starts = stack_scores([scorer(tiny_experts[n], "bible", "valid") for n in keep])
    lp, starts = stack_scores([scorer(tiny_experts[n], "bible", "test") for n in keep])
    untempered = ensemble.estimate_prior(held_lp, held_starts)
    t, _ = ensemble.choose_temperature(held_lp, held_starts, untempered, (1.0, 4.0))
    without = ensemble.nll(ensemble.ensemble_logprobs(lp, starts, "posterior", ensemble.temper_prior(untempered, t)))
    row = next(r for r in rows if r["removed"] == "legal" and r["eval_domain"] == "bible")
    assert row["nll_without"] == pytest.approx(without, rel=1e-12)
    assert row["temperature_without"] == t and row["experts_left"] == 2
    assert row["rel_ppl_change"] == pytest.approx(math.exp(row["nll_without"] - row["nll_full"]) - 1, rel=1e-12)
    # The experts are nudged towards their own domain: removing one costs most on its own domain.
    for d in DOMAINS:
        own = next(r for r in rows if r["removed"] == d and r["eval_domain"] == d)["rel_ppl_change"]
        others = [r["rel_ppl_change"] for r in rows if r["removed"] != d and r["eval_domain"] == d]
        assert own > 0 and own > max(others), (d, own, others)


def test_removal_never_scores(tiny_data, tiny_experts, tmp_path):
    from fairseq_ext.ablation import ablate_experts
    from fairseq_ext.evaluate import EvalSettings

    dirs = _dirs(tmp_path, tiny_data)
    with pytest.raises(BtmError, match=r"no cached scores of expert 'bible' on bible/valid .*btm run"):
        ablate_experts(tiny_experts, ["bible"], dirs, settings=EvalSettings())
    assert not (tmp_path / "scores").exists() or not list((tmp_path / "scores").iterdir())
    with pytest.raises(BtmError, match="ensemble method; 'topk_prior' is a topk method"):
        ablate_experts(tiny_experts, ["bible"], dirs, method="topk_prior")
    with pytest.raises(BtmError, match="at least 2 experts"):
        ablate_experts({"bible": tiny_experts["bible"]}, ["bible"], dirs)


def test_forest_ablate_cli_writes_the_table_and_heatmap(tiny_data, tiny_experts, small_corpus, tmp_path):
    from fairseq_ext.ablation import ablate_experts
    from fairseq_ext.evaluate import EvalSettings

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(textwrap.dedent(f"""\
        name: audit
        corpus: {{path: {small_corpus}}}
        domains: {{train: [{', '.join(DOMAINS)}], eval: [{', '.join(DOMAINS)}]}}
        model: {{preset: tiny}}
        evaluation: {{methods: [ensemble_posterior], prior_estimator: block_end}}
        """))
    shutil.copytree(tiny_data, run / "data")
    for d, path in tiny_experts.items():
        run_btm("forest", "add", run, d, path, "--domains", d, check=True)
    # The eval stage's settings: block_end prior on blocks of the tiny preset's 128 tokens.
    from fairseq_ext.priors import PriorSettings

    settings = EvalSettings(split="test", prior=PriorSettings(estimator="block_end", block_tokens=128))
    dirs = _dirs(run, run / "data")
    _prescore(tiny_experts, dirs, settings)

    r = run_btm("forest", "ablate", run, "--method", "ensemble_prior", check=True)
    assert "relative perplexity change without each expert (ensemble_prior, split test)" in r.stdout
    table = pd.read_csv(run / "results" / "ablation.csv")
    assert (run / "results" / "ablation.png").stat().st_size > 0
    expected = pd.DataFrame(ablate_experts(tiny_experts, DOMAINS, dirs, settings=settings, method="ensemble_prior"))
    assert table["prior"].iloc[0].startswith("block_end(") and "block_tokens=128" in table["prior"].iloc[0]
    np.testing.assert_allclose(table["rel_ppl_change"], expected["rel_ppl_change"], rtol=1e-8)
    assert list(table["removed"]) == list(expected["removed"])

    bad = run_btm("forest", "ablate", run, "--method", "average_uniform")
    assert bad.returncode == 2 and "ensemble method" in bad.stderr and "Traceback" not in bad.stderr


def _ablation_rows(experts, domains):
    """Rows as fairseq_ext/ablation.py returns them: removing e costs 20% on e's domain, 1% elsewhere."""
    rows = []
    for e in experts:
        for d in domains:
            change = 0.20 if d == e else 0.01
            rows.append({"removed": e, "eval_domain": d, "split": "test", "method": "ensemble_posterior",
                         "prior": "ewma(alpha=0.3,batches=all,batch_docs=2,split=valid)", "temperature_full": 1.0,
                         "temperature_without": 1.0, "experts_left": len(experts) - 1, "nll_full": 2.0,
                         "nll_without": 2.0 + math.log1p(change), "ppl_full": math.exp(2.0),
                         "ppl_without": math.exp(2.0) * (1 + change), "rel_ppl_change": change})
    return rows


def test_report_shows_the_removal_table_and_heatmap(tmp_path):
    from analysis_synth import TRAIN, make_run
    from launcher.contract.ablation import write_ablation
    from launcher.contract.layout import RunLayout

    run = make_run(tmp_path, "forest")
    write_ablation(RunLayout(run).ablation, _ablation_rows(TRAIN, TRAIN))
    run_btm("report", run, "--out", tmp_path / "out", check=True)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Expert removal" in md and "**Run forest** (ensemble_posterior, test split)" in md
    table = pd.read_csv(tmp_path / "out" / "tables" / "ablation.forest.csv", index_col=0)
    assert table.loc["legal", "legal"] == pytest.approx(20.0) and table.loc["legal", "bible"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "plots" / "ablation.forest.png").stat().st_size > 0


def test_a_damaged_removal_table_names_the_command_that_rebuilds_it(tmp_path):
    from analysis_synth import TRAIN, make_run
    from launcher.contract.ablation import write_ablation
    from launcher.contract.layout import RunLayout

    run = make_run(tmp_path, "forest")
    path = RunLayout(run).ablation
    write_ablation(path, _ablation_rows(TRAIN, TRAIN))
    path.write_text(path.read_text()[: len(path.read_text()) // 2])  # cut mid-row
    r = run_btm("report", run, "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(path) in r.stderr and f"btm forest ablate {run}" in r.stderr
