"""The reproduction configs in examples/ (docs/results.md) stay valid against ../shared/corpus."""
from __future__ import annotations

import json
import os
import re
import sys
import subprocess
from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.plan import build_plan
from tests.conftest import CORPUS, REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert {p.stem for p in EXAMPLES} >= {"btm-forest", "seed-fraction", "cbtm", "grow"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_resolves_the_shared_corpus(path: Path):
    cfg = load_config(path)  # checks every domain exists in the corpus
    assert Path(cfg.corpus.path) == CORPUS.resolve()
    assert cfg.executor == "local" and cfg.model.preset == "tiny"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_forest_tokens_equal_the_dense_budget(path: Path):
    """The base forest (seed + one expert per domain/cluster) sees the dense run's tokens."""
    from launcher.profiles import load_profile
    cfg = load_config(path)
    plan = build_plan(cfg, load_profile(cfg.profile), "/tmp/unused")
    jobs = {j.stage: j for j in plan.jobs}
    forest = sum(j.budget.tokens * len([u for u in j.units if not (u.name or "").startswith("random")])
                 for stage, j in jobs.items() if stage in ("seed", "train"))
    assert forest == pytest.approx(cfg.total_updates * cfg.total_gpus * cfg.preset.tokens_per_update_per_gpu, rel=0.01)


def test_reproduce_script_parses_and_names_only_existing_configs():
    script = REPO / "examples" / "reproduce.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    named = set(re.findall(r"\b([\w-]+\.yaml)\b", text))
    assert {"btm-forest.yaml", "seed-fraction.yaml", "cbtm.yaml", "grow.yaml"} <= named
    for name in named:
        assert (REPO / "examples" / name).is_file(), name


def _reproduce_commands(tmp_path, **env) -> list[list[str]]:
    """The btm command lines examples/reproduce.sh issues (BTM: a recorder of its arguments)."""
    log = tmp_path / "calls.jsonl"
    recorder = tmp_path / "btm"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    recorder.chmod(0o755)
    subprocess.run(["bash", str(REPO / "examples" / "reproduce.sh"), str(tmp_path / "runs"), "all"], check=True,
                   env={**os.environ, "BTM": str(recorder), **env})
    return [json.loads(line) for line in log.read_text().splitlines()]


def _run_dirs(calls) -> dict[str, list[str]]:
    return {Path(c[c.index("--run-dir") + 1]).name: c for c in calls if c[0] == "run"}


def test_reproduce_without_seeds_keeps_one_run_per_finding(tmp_path):
    runs = _run_dirs(_reproduce_commands(tmp_path))
    assert sorted(runs) == sorted(["btm-forest", "grow-posterior", "grow-seed", "cbtm1", "cbtm2", "cbtm4",
                                   "cbtm8", "sf0", "sf10", "sf30", "sf70", "sf90", "moe-zero", "moe-data"])
    assert "moe.router_init=data" in runs["moe-data"] and "moe.enabled=true" in runs["moe-zero"]
    assert not any("seed=" in a or "model.preset" in a for c in runs.values() for a in c)


def test_reproduce_with_seeds_and_sizes_repeats_the_findings(tmp_path):
    calls = _reproduce_commands(tmp_path, SEEDS="1 2 3", SIZES="tiny small")
    runs = _run_dirs(calls)
    for seed in (1, 2, 3):
        for base in ("btm-forest", "sf30", "cbtm4", "grow-seed", "moe-zero"):
            call = runs[f"{base}.seed{seed}"]
            assert call.count(f"seed={seed}") == 1
            assert "model.preset=small" not in call
        for base in ("btm-forest", "sf0", "sf90"):  # F1 F2 F3 at the second size
            call = runs[f"{base}.small.seed{seed}"]
            assert "model.preset=small" in call and f"seed={seed}" in call
    assert "cbtm4.small.seed1" not in runs and "grow-seed.small.seed1" not in runs
    evals = [c for c in calls if c[0] == "eval" and "topk_prior" in c]
    assert len(evals) == 6  # F5 on every forest: 3 seeds x 2 sizes
    report = [c for c in calls if c[0] == "report"]
    assert len(report) == 1
    ablate = [c for c in calls if c[:2] == ["forest", "ablate"]]
    assert sorted(Path(c[2]).name for c in ablate) == sorted(
        f"btm-forest{size}.seed{s}" for s in (1, 2, 3) for size in ("", ".small"))
    merges = [c for c in calls if c[0] == "eval" and any(a.startswith("merge_") for a in c)]
    assert sorted(Path(c[1]).name for c in merges) == [f"btm-forest.seed{s}" for s in (1, 2, 3)]  # F9 at tiny
    assert all(c[c.index("--methods") + 1].count("merge_") == 5 for c in merges)
    priors = [c for c in calls if c[0] == "eval" and "ensemble_prior,ensemble_posterior" in c]
    assert len(priors) == 6 * 2 * 3  # per forest: valid and test, three estimators
    assert sum("block_end" in c for c in priors) == 12
    # T = 1 (document and block_end) spelled out, since the default chooses T among five
    assert sorted(c.count("--prior-temperature") for c in priors) == [1] * 24 + [5] * 12
