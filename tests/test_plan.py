"""The plan: jobs, arrays, dependencies, budgets, resume pruning, and the --dry-run text (golden)."""
from __future__ import annotations

import pytest

from conftest import run_btm
from golden_util import check_golden
from launcher.config import load_config
from launcher.plan import build_plan, format_plan
from launcher.profiles import load_profile

DOMAINS = ["bible", "code_python", "legal", "dictionary", "kernel_docs", "fiction", "encyclopedia", "quotes"]


@pytest.fixture
def empty_corpus(tmp_path):
    for d in DOMAINS:
        (tmp_path / "corpus" / d).mkdir(parents=True)
    return tmp_path / "corpus"


def _plan(name, done=lambda stage, unit: False, profile=None, corpus=None):
    cfg = load_config(name, corpus=corpus)
    return build_plan(cfg, load_profile(profile or cfg.profile), "runs/x", done)


def test_stages_and_dependencies_of_the_paper_setup(paper_corpus):
    plan = _plan("paper-350m", corpus=paper_corpus)
    jobs = {j.name: j for j in plan.jobs}
    assert list(jobs) == ["data_plan", "data_shard", "data", "seed", "train", "dense", "merge", "score", "eval",
                          "report"]
    assert jobs["data_shard"].array and jobs["data_shard"].after_ok == ["data_plan"]
    assert jobs["data"].after_ok == ["data_shard"]
    assert jobs["train"].array and len(jobs["train"].units) == 16  # 8 experts + 8 random-split experts
    assert jobs["train"].after_ok == ["seed"] and jobs["seed"].after_ok == ["data"]
    assert jobs["merge"].after_any == ["train"] and jobs["merge"].after_ok == []
    assert jobs["score"].after_ok == ["merge", "dense"] and len(jobs["score"].units) == 17  # one per model
    assert jobs["dense"].after_ok == ["data"]


@pytest.mark.parametrize("preset", ["125m", "350m", "750m", "1.3b"])
def test_forest_compute_equals_the_dense_baseline(preset, paper_corpus):
    plan = _plan(f"paper-{preset}", corpus=paper_corpus)
    seed, train, dense = plan.job("seed"), plan.job("train"), plan.job("dense")
    n_experts = 8
    forest = seed.budget.gpu_updates + n_experts * train.budget.gpu_updates
    assert forest == pytest.approx(dense.budget.gpu_updates)
    seed_tokens = seed.budget.tokens + n_experts * train.budget.tokens
    assert seed_tokens == pytest.approx(dense.budget.tokens, rel=1e-3)
    # GPUs: each expert gets its share of the dense run's GPUs, seed and dense all of them, a
    # node's worth per node (up to the profile's max_nodes; the rest is gradient accumulation).
    per_node, G = plan.profile.gpus_per_node, plan.config.total_gpus
    assert train.gpus_per_node == min(per_node, G // n_experts)
    assert seed.gpus_per_node == dense.gpus_per_node == min(per_node, G)
    assert seed.nodes == dense.nodes == min(plan.profile.max_nodes, -(-G // per_node))
    assert train.nodes * train.gpus_per_node == max(G // n_experts, per_node) or train.nodes == 1


def test_resume_prunes_done_units_and_invalidates_downstream():
    done = {("data_plan", None), ("data_shard", "t0"), ("data", None), ("seed", None), ("train", "bible"),
            ("train", "legal")}
    plan = _plan("tiny", lambda stage, unit: (stage, unit.name) in done)
    submit = {j.name: j for j in plan.to_submit}
    assert set(submit) == {"train", "merge", "score", "eval", "report"}
    assert [u.name for u in submit["train"].units] == ["code_python"]
    assert submit["train"].after_ok == []  # seed is done: no dependency on it
    assert submit["merge"].after_any == ["train"]


def test_upstream_rerun_makes_everything_downstream_pending():
    done = lambda stage, unit: stage != "seed"
    plan = _plan("tiny", done)
    submit = {j.name: j for j in plan.to_submit}
    assert len(submit["train"].units) == 3 and "data" not in submit


def test_finished_run_submits_nothing():
    assert _plan("tiny", lambda stage, unit: True).to_submit == []


def test_random_split_and_cbtm_units():
    cfg = load_config("tiny")
    cfg.baselines = ["random_split", "dense"]
    plan = build_plan(cfg, load_profile("local"), "r")
    names = [u.name for u in plan.job("train").units]
    assert names == ["bible", "code_python", "legal", "random0", "random1", "random2"]
    assert plan.job("train").units[3].params["domains"] == ["random0"]
    assert plan.job("data_plan").units[0].params["random_split"] == 3
    assert plan.job("data").units[0].params["domains"][-3:] == ["random0", "random1", "random2"]
    cb = _plan("cbtm-tiny")
    assert [j.name for j in cb.jobs][:7] == ["data_plan", "data_shard", "data", "cluster_fit", "cluster_assign",
                                             "cluster", "seed"]
    assert cb.job("cluster_assign").array and cb.job("cluster").after_ok == ["cluster_assign"]
    assert [u.name for u in cb.job("train").units] == ["cluster_0", "cluster_1"]


def test_incremental_domains_grow_after_merge():
    cfg = load_config("tiny")
    cfg.domains.incremental = ["fiction"]
    plan = build_plan(cfg, load_profile("local"), "r",
                      lambda stage, unit: stage in ("data_plan", "data_shard", "data", "seed", "train", "merge"))
    submit = {j.name: j for j in plan.to_submit}
    assert set(submit) == {"data_incremental", "grow", "score", "eval", "report"}
    grow = submit["grow"]
    assert [u.name for u in grow.units] == ["fiction"] and grow.array
    assert grow.units[0].params["parents"] == ["bible", "code_python", "legal"]
    assert grow.units[0].params["init"] == "posterior" and grow.units[0].params["top_k"] == 2
    assert grow.after_ok == ["data_incremental"]


def test_dry_run_golden(empty_corpus, tmp_path):
    # btm resolves the run directory (stage commands run inside it); the golden keeps it relative.
    r = run_btm("run", "tiny", "--run-dir", "runs/tiny", "--corpus", empty_corpus, "--dry-run", cwd=tmp_path, check=True)
    check_golden("dry_run_tiny.txt", r.stdout.replace(f"{tmp_path.resolve()}/", ""))
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    r = run_btm("run", "paper-125m", "--run-dir", "runs/p", "--corpus", empty_corpus, "--dry-run", cwd=tmp_path,
                check=True)
    check_golden("dry_run_paper-125m.txt", r.stdout.replace(f"{tmp_path.resolve()}/", ""))


def test_dry_run_shows_what_is_left():
    plan = _plan("tiny", lambda stage, unit: stage.startswith("data") or (stage == "seed"))
    text = format_plan(plan)
    assert all("done" in line for line in text.splitlines()[7:11]) and "jobs to submit: 5" in text


def test_run_errors(empty_corpus, tmp_path):
    r = run_btm("run", "tiny", "--run-dir", tmp_path / "r", "--dry-run")
    assert r.returncode == 2 and "corpus.path is not set" in r.stderr
    r = run_btm("run", "tiny", "--dry-run")
    assert r.returncode == 2 and "--run-dir" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndomains: {train: [bible], eval: [bible]}\nprofile: nosuch\n")
    r = run_btm("run", bad, "--run-dir", tmp_path / "r", "--corpus", empty_corpus, "--dry-run")
    assert r.returncode == 2 and "unknown cluster profile 'nosuch'" in r.stderr and "bad.yaml" in r.stderr


def test_existing_run_refuses_a_different_training_setup(empty_corpus, tmp_path):
    from launcher.commands.run import reconcile

    old = load_config("tiny", corpus=empty_corpus)
    new = load_config("tiny", corpus=empty_corpus, overrides={"budget": {"total_updates": 99, "gpus": 1,
                                                                         "seed_fraction": 0.5, "save_interval_updates": 4}})
    from launcher.contract.errors import BtmError

    with pytest.raises(BtmError, match="budget differs"):
        reconcile(old, new)
    grown = load_config("tiny", corpus=empty_corpus)
    grown.domains.train = [*grown.domains.train, "fiction"]
    out = reconcile(old, grown)
    assert out.domains.train == old.domains.train and out.domains.incremental == ["fiction"]


def test_demo_dry_run_builds_the_embedded_corpus(tmp_path):
    r = run_btm("run", "--demo", tmp_path / "demo", "--dry-run", check=True)
    assert "building the demo corpus" in r.stdout
    assert "train units: python_code, docstrings, bytecode, arithmetic" in r.stdout
    assert (tmp_path / "demo" / "demo_corpus" / "word_problems" / "test.jsonl").is_file()
    assert not (tmp_path / "demo" / "config.yaml").exists()  # a dry run starts nothing
