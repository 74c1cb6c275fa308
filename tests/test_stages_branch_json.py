"""An expert's branch.json names its parents in forest.json: a corrupt or missing one is an
error that names the file and says what to do, never an expert with no parents."""
from __future__ import annotations

import json

import pytest

from conftest import run_btm
from launcher.config import load_config
from launcher.contract.layout import RunLayout
from launcher.records import HashCache, hash_files, now, write_record
from launcher.stages import find_unit


def _run_with_trained_experts(tmp_path, seed_fraction=0.5):
    """A tiny run whose train records are current (stand-in checkpoints), ready to merge."""
    cfg = load_config("tiny", overrides={"budget.seed_fraction": seed_fraction})
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    layout.config.write_text(cfg.to_yaml())
    cache = HashCache(layout.root)
    for name in cfg.expert_names:
        ckpt = layout.checkpoint(name)
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(name.encode())
        if seed_fraction:
            seed = layout.checkpoint("seed")  # as branch_expert writes it (fairseq_ext/branch.py)
            (ckpt.parent / "branch.json").write_text(json.dumps({
                "out": "init.pt", "sha256": "0" * 64, "method": "seed",
                "parents": [{"path": str(seed), "sha256": "1" * 64, "weight": 1.0}],
                "parent_names": {"seed": 1.0}}))
        write_record(layout.root, "train", name, params=find_unit(cfg, "train", name).params,
                     config_hash=cfg.config_hash(), inputs={}, outputs=hash_files(cache, [ckpt]),
                     started=now(), extra={"train": {"num_updates": 12, "tokens": 100, "valid_losses": {}}})
    cache.save()
    return layout


def test_merge_records_the_parents_from_branch_json(tmp_path):
    layout = _run_with_trained_experts(tmp_path)
    run_btm("stage", layout.root, "merge", check=True)
    experts = json.loads(layout.forest.read_text())["experts"]
    assert [e["parents"] for e in experts] == [{"seed": 1.0}] * 3


def test_experts_from_random_init_have_no_branch_json_and_no_parents(tmp_path):
    layout = _run_with_trained_experts(tmp_path, seed_fraction=0.0)
    run_btm("stage", layout.root, "merge", check=True)
    assert [e["parents"] for e in json.loads(layout.forest.read_text())["experts"]] == [{}] * 3


@pytest.mark.parametrize("content, problem", [
    ("{not json", ": not a readable branch record"),
    ('{"parents": []}', ": not a btm branch record (needs 'out' and a 'parents' list)"),
    ('{"out": "init.pt", "parents": []}', " is unreadable (it has no 'parent_names' mapping)"),
    (None, " is missing"),
])
def test_corrupt_or_missing_branch_json_is_an_error_naming_it(tmp_path, content, problem):
    layout = _run_with_trained_experts(tmp_path)
    branch_json = layout.model_dir("code_python") / "branch.json"
    if content is None:
        branch_json.unlink()
    else:
        branch_json.write_text(content)
    r = run_btm("stage", layout.root, "merge")
    assert r.returncode == 2, r.stderr
    assert f"{branch_json}{problem}" in r.stderr
    assert f"delete {branch_json.parent} and run `btm run` again" in r.stderr
