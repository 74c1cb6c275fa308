"""The reproduction configs in examples/ (docs/results.md) stay valid against ../shared/corpus."""
from __future__ import annotations

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
    for name in ("btm-forest", "seed-fraction", "cbtm", "grow"):
        assert f'"$here/{name}.yaml"' in text
