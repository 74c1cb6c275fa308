"""The moe stage in the plan: after merge, on all of the budget's GPUs, its updates taken from
the experts' so that seed + experts + MoE stay compute-matched with the dense baseline; the
config section `moe:` is validated naming the key."""
from __future__ import annotations

import pytest

from launcher.config import load_config
from launcher.contract.errors import BtmError
from launcher.plan import build_plan, format_plan
from launcher.profiles import load_profile

MOE_ON = {"moe.enabled": True, "moe.budget_share": 0.1}


def _plan(name, corpus, overrides=None):
    cfg = load_config(name, overrides, corpus=corpus)
    return build_plan(cfg, load_profile(cfg.profile), "runs/x", lambda stage, unit: False)


@pytest.mark.parametrize("preset", ["125m", "1.3b"])
def test_the_moe_stage_runs_after_merge_and_its_compute_counts_in_the_budget(preset, paper_corpus):
    plan = _plan(f"paper-{preset}", paper_corpus, MOE_ON)
    jobs = {j.name: j for j in plan.jobs}
    assert list(jobs).index("moe") == list(jobs).index("merge") + 1
    assert jobs["moe"].after_ok == ["merge"] and not jobs["moe"].array
    seed, train, moe, dense = jobs["seed"], jobs["train"], jobs["moe"], jobs["dense"]
    total = plan.config.total_updates
    assert moe.budget.updates == round(0.1 * total)
    assert train.budget.updates == total - seed.budget.updates - moe.budget.updates
    n_experts = len(plan.config.expert_names)
    forest = seed.budget.gpu_updates + n_experts * train.budget.gpu_updates + moe.budget.gpu_updates
    assert forest == pytest.approx(dense.budget.gpu_updates)
    text = format_plan(plan)
    assert f"MoE {moe.budget.updates} updates on {plan.config.total_gpus} GPUs" in text


def test_without_moe_the_plan_is_unchanged(paper_corpus):
    plain, off = _plan("paper-125m", paper_corpus), _plan("paper-125m", paper_corpus, {"moe.enabled": False})
    assert [j.name for j in plain.jobs] == [j.name for j in off.jobs]
    assert "moe" not in [j.name for j in plain.jobs]
    assert plain.job("train").budget == off.job("train").budget


def test_posterior_weights_use_the_evaluation_sections_prior(paper_corpus):
    """The MoE's posterior weights come from the cached prior the ensembles use, so the moe
    unit carries the evaluation section's prior keys (and a change to them re-runs it)."""
    from launcher.stages.moe import moe_units
    cfg = load_config("paper-125m", {**MOE_ON, "moe.weights": "posterior",
                                     "evaluation.prior_estimator": "block_end",
                                     "evaluation.prior_temperatures": [1, 10]}, corpus=paper_corpus)
    (unit,) = moe_units(cfg)
    assert unit.params["prior_estimator"] == "block_end"
    assert unit.params["prior_temperatures"] == [1, 10]
    assert unit.params["prior_block_tokens"] == cfg.preset.tokens_per_sample


@pytest.mark.parametrize("overrides, message", [
    ({"moe.top_k": 9}, "moe.top_k: must be in 1..8"),
    ({"moe.router_init": "random"}, "moe.router_init: unknown value 'random'"),
    ({"moe.weights": "argmax"}, "moe.weights: unknown value 'argmax'"),
    ({"moe.train": "experts"}, "moe.train: unknown value 'experts'"),
    ({"moe.budget_share": 0.6}, r"moe.budget_share: must be in \(0, 1 - budget.seed_fraction = 0.5\)"),
    ({"moe.aux_loss_coef": -0.1}, r"moe.aux_loss_coef: must be in \[0, inf\]"),
])
def test_bad_moe_settings_name_the_key(overrides, message, paper_corpus):
    with pytest.raises(BtmError, match=message):
        load_config("paper-125m", {**MOE_ON, **overrides}, corpus=paper_corpus)
