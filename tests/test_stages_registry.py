"""The stage registry: one declaration per stage, in pipeline order, found by name."""
from __future__ import annotations

import dataclasses

import pytest

from launcher.config import load_config, named_configs
from launcher.contract.errors import BtmError
from launcher.stages import STAGES, TRAINING_STAGES, get_stage


def test_stages_in_pipeline_order_and_the_training_ones():
    assert [s.name for s in STAGES] == ["data_plan", "data_shard", "data", "cluster_fit", "cluster_assign",
                                        "cluster", "seed", "train", "dense", "merge", "moe", "data_incremental",
                                        "grow", "score", "eval", "report"]
    assert TRAINING_STAGES == ("seed", "train", "dense", "moe", "grow")


def test_unknown_stage_gets_a_did_you_mean():
    with pytest.raises(BtmError, match=r"unknown stage 'trian'; did you mean 'train'\?; known: data_plan, data_shard, data, cluster_fit"):
        get_stage("trian")


def test_a_stage_waits_only_for_stages_before_it(paper_corpus):
    for name in named_configs():
        cfg = load_config(name, corpus=paper_corpus if name.startswith("paper-") else None)
        enabled = [s.name for s in STAGES if s.enabled(cfg)]
        for i, stage in enumerate(s for s in STAGES if s.enabled(cfg)):
            for dep in [*stage.after_ok(cfg), *stage.after_any(cfg)]:
                assert dep in enabled[:i], (name, stage.name, dep)


@pytest.mark.parametrize("name", ["tiny", "cbtm-tiny", "demo", "paper-125m"])
def test_record_params_round_trip_through_each_stages_typed_params(name, paper_corpus):
    """A unit's record params are exactly its stage's typed parameters, as a plain dict."""
    cfg = load_config(name, corpus=paper_corpus if name.startswith("paper-") else None)
    cfg.baselines = ["dense", "random_split"]
    for stage in STAGES:
        for unit in stage.units(cfg):
            typed = stage.params(**unit.params)
            assert dataclasses.asdict(typed) == unit.params
            assert dataclasses.is_dataclass(typed) and typed.__dataclass_params__.frozen
