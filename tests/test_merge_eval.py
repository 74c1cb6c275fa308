"""Merge methods as evaluation methods (merge_<method>_<weighting>): the registry, the config,
`btm eval --methods merge_*`, `btm average --method ties ...` and the eval stage."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_btm
from eval_fixtures import DOMAINS, make_expert, tiny_data  # noqa: F401
from launcher.contract import methods as registry
from launcher.contract.errors import BtmError
from launcher.contract.results import read_results

TOKENS = ["--tokens-per-sample", "64", "--device", "cpu"]


def test_the_registry_lists_every_merge_method_but_linear_with_both_weightings():
    from fairseq_ext.merging import method_names

    assert list(registry.MERGE_LABELS) == [m for m in method_names() if m != "linear"]
    merges = [m.name for m in registry.METHODS if m.kind == "merge"]
    assert merges == [f"merge_{m}_{w}" for m in registry.MERGE_LABELS for w in ("uniform", "posterior")]
    assert registry.label("merge_ties_posterior") == "TIES posterior"
    assert registry.get_method("merge_dare_ties_posterior").needs_prior
    assert not registry.get_method("merge_dare_ties_uniform").needs_prior
    assert registry.merge_parts("merge_dare_ties_uniform") == ("dare_ties", "uniform")
    assert registry.merge_parts("average_argmax") == ("linear", "argmax")
    assert registry.merge_method_name("linear", "posterior") == "average_posterior"
    with pytest.raises(BtmError, match="'ties' with 'argmax' weights is not an evaluation method"):
        registry.merge_method_name("ties", "argmax")


def test_the_config_accepts_merge_methods_and_suggests_for_a_typo():
    from launcher.config import parse_config

    base = {"name": "t", "domains": {"train": ["bible", "legal"], "eval": ["bible"]},
            "model": {"preset": "tiny"}}
    ok = parse_config(yaml.safe_dump({**base, "evaluation": {"methods": ["merge_ties_posterior"]}}), "cfg.yaml")
    assert list(ok.evaluation.methods) == ["merge_ties_posterior"]
    with pytest.raises(BtmError, match=r"evaluation.methods\[0\].*did you mean 'merge_ties_posterior'"):
        parse_config(yaml.safe_dump({**base, "evaluation": {"methods": ["merge_ties_posteror"]}}), "cfg.yaml")


@pytest.fixture
def branched_experts(tiny_data, tmp_path_factory) -> dict:
    """A seed LM and one expert per domain branched from it by `btm branch` (branch.json beside
    each, so the merge's base resolves). An expert is the seed (same random init) nudged
    towards its domain's unigram distribution: its task vector is that nudge."""
    root = tmp_path_factory.getbasetemp() / "merge_forest"
    seed = make_expert(tiny_data, root / "seed" / "checkpoint_last.pt", domain=None, seed=0)
    experts = {}
    for d in DOMAINS:
        ckpt = root / d / "checkpoint_last.pt"
        if not ckpt.exists():
            run_btm("branch", "--from-seed", seed, "--out", root / d / "init.pt", check=True)
            make_expert(tiny_data, ckpt, domain=d, seed=0)
        experts[d] = ckpt
    return {"seed": seed, "experts": experts}


def _experts_arg(experts: dict) -> str:
    return ",".join(f"{n}={p}" for n, p in experts.items())


@pytest.mark.fairseq
def test_btm_eval_and_average_compute_merge_rows(tiny_data, branched_experts, tmp_path, capsys):
    from launcher.cli import main

    run = tmp_path / "run"
    experts = branched_experts["experts"]
    common = ["--experts", _experts_arg(experts), "--data", str(tiny_data), *TOKENS]
    methods = "expert,average_uniform,average_posterior,merge_ties_posterior,merge_task_arithmetic_uniform"
    run_btm("eval", run, *common, "--domains", "legal,bible", "--methods", methods, check=True)
    table = read_results(run)
    rows = {(m, d): r for m, d, r in zip(table.method, table.eval_domain, table.itertuples())}
    for d in ("legal", "bible"):
        ties = rows["merge_ties_posterior", d]
        assert ties.k == 3 and ties.prior == rows["average_posterior", d].prior and f"target={d}" in ties.prior
        uniform = rows["merge_task_arithmetic_uniform", d]
        assert uniform.k == 3 and uniform.prior == "none"
        # Task arithmetic with lambda 1 and weights summing to 1 is the linear average.
        assert uniform.ppl == pytest.approx(rows["average_uniform", d].ppl, rel=1e-4)
    # One posterior merge per eval domain, one uniform merge for all; average.json says how.
    assert sorted(p.name for p in (run / "averages").iterdir()) == [
        "posterior.bible", "posterior.legal", "task_arithmetic_uniform", "ties_posterior.bible",
        "ties_posterior.legal", "uniform"]
    record = json.loads((run / "averages" / "ties_posterior.legal" / "average.json").read_text())
    assert record["merge"] == {"method": "ties", "params": {"density": 0.2, "lambda_": 1.0}, "seed": 0,
                               "base": {"path": str(branched_experts["seed"]),
                                        "sha256": record["merge"]["base"]["sha256"]}}
    assert "merge" not in json.loads((run / "averages" / "posterior.legal" / "average.json").read_text())
    # The report shows them under their labels.
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = "\n".join(p.read_text() for p in (tmp_path / "report").rglob("*.md"))
    assert "TIES posterior" in report and "Task arithmetic uniform" in report

    # btm average with explicit parameters; a re-run reuses only an identical merge.
    avg = ["average", str(run), *common, "--method", "ties", "--weights", "posterior",
           "--target-domain", "legal"]
    ckpt = run / "averages" / "ties_posterior.legal" / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns
    assert main(avg) == 0 and ckpt.stat().st_mtime_ns == before
    assert main([*avg, "--density", "0.5"]) == 0 and ckpt.stat().st_mtime_ns != before
    record = json.loads(ckpt.with_name("average.json").read_text())
    assert record["merge"]["params"]["density"] == 0.5
    assert "merge (ties)" in capsys.readouterr().out


@pytest.mark.fairseq
def test_a_ties_merge_of_one_expert_with_density_1_is_that_expert(tiny_data, branched_experts, tmp_path):
    run = tmp_path / "run"
    one = ["--experts", _experts_arg({"legal": branched_experts["experts"]["legal"]}),
           "--data", str(tiny_data), *TOKENS]
    run_btm("eval", run, *one, "--domains", "legal", "--methods", "expert", check=True)
    proc = run_btm("average", run, *one, "--method", "ties", "--weights", "posterior", "--density", "1",
                   "--target-domain", "legal", check=True)
    assert "merge (ties)" in proc.stdout
    table = read_results(run)
    ppl = dict(zip(table.method, table.ppl))
    assert ppl["merge_ties_posterior"] == pytest.approx(ppl["expert:legal"], rel=1e-5)
    assert int(table[table.method == "merge_ties_posterior"].k.iloc[0]) == 1


@pytest.mark.fairseq
def test_bad_merge_requests_are_clear_errors(tiny_data, branched_experts, tmp_path, capsys):
    from launcher.cli import main

    run = tmp_path / "run"
    common = ["--experts", _experts_arg(branched_experts["experts"]), "--data", str(tiny_data), *TOKENS]
    loose = make_expert(tiny_data, tmp_path / "loose" / "checkpoint_last.pt", domain="legal", seed=0)
    avg = ["average", str(run), *common, "--target-domain", "legal"]
    for argv, message in [
        (["eval", str(run), *common, "--domains", "legal", "--methods", "merge_ties_posteror"],
         "did you mean 'merge_ties_posterior'?"),
        ([*avg, "--method", "tiess", "--weights", "posterior"], "did you mean 'ties'?"),
        ([*avg, "--method", "ties", "--weights", "posterior", "--density", "1.5"],
         "ties: density must be in (0, 1]"),
        ([*avg, "--method", "ties", "--weights", "posterior", "--density", "0"],
         "ties: density must be in (0, 1]"),
        ([*avg, "--method", "model_stock", "--weights", "posterior", "--density", "0.5"],
         "merge method 'model_stock' has no parameter 'density'"),
        ([*avg, "--method", "ties"], "--method ties needs --weights"),
        ([*avg, "--method", "posterior", "--density", "0.5"], "--density: only for merge methods"),
        (["average", str(run), "--experts", f"legal={loose}", "--data", str(tiny_data), *TOKENS,
          "--method", "ties", "--weights", "uniform", "--eval-domains", "legal"],
         f"{loose} has no branch.json beside it"),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (run / "averages").exists() or not any((run / "averages").iterdir())


@pytest.mark.fairseq
def test_the_eval_stage_files_merge_rows(tiny_data, branched_experts, tmp_path, monkeypatch):
    from dataclasses import asdict
    from types import SimpleNamespace

    from launcher.contract.forest import Forest
    from launcher.contract.layout import RunLayout
    from launcher.stages import eval as eval_stage
    from launcher.stages.base import Ctx, Unit

    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    layout.data.symlink_to(tiny_data, target_is_directory=True)
    forest = Forest(run="run", path=layout.forest)
    for name, path in branched_experts["experts"].items():
        forest.add(name, [name], path)
    forest.save()
    params = eval_stage.EvalParams(methods=["merge_dare_ties_posterior", "merge_model_stock_uniform"], top_k=1,
                                   split="test", baselines=[], domains=["legal", "bible"],
                                   experts=list(branched_experts["experts"]), run="run")
    monkeypatch.setenv("BTM_DEVICE", "cpu")
    eval_stage.eval_run(Ctx(layout.root, SimpleNamespace(name="tiny", expert_names=params.experts),
                            Unit(None, asdict(params)), eval_stage.STAGE))
    table = read_results(layout.root)
    assert sorted(zip(table.method, table.eval_domain, table.k)) == [
        ("merge_dare_ties_posterior", "bible", 3), ("merge_dare_ties_posterior", "legal", 3),
        ("merge_model_stock_uniform", "bible", 3), ("merge_model_stock_uniform", "legal", 3)]
