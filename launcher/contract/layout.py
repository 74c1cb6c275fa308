"""The run directory: where every file of a run lives (docs/architecture.md draws the tree).

``RunLayout(run_dir)`` is the only place that joins a run directory with a file name; every
other module asks it for paths. Model code (fairseq_ext) never sees a ``RunLayout``: the
launcher hands it the plain paths it needs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Names of the run's own model directories: a training domain or expert may not take them.
SEED = "seed"
DENSE = "dense"
MOE = "moe"  # the forest turned into one Mixture-of-Experts model (stage moe)
RANDOM_SPLIT_PREFIX = "random"  # random<i>: the random-split baseline's experts and domains


def random_split_name(i: int) -> str:
    return f"{RANDOM_SPLIT_PREFIX}{i}"


def reserved_name_collision(name: str) -> str | None:
    """What a domain or expert called ``name`` would collide with, or None if it is free.

    seed/ and dense/ are model directories and units of their own (an expert ``seed`` *is* the
    seed checkpoint: zero expert updates); ``random<i>`` are the random-split baseline's corpus
    domains, experts and units, and reports read any ``random<i>`` as that baseline."""
    if name in (SEED, DENSE):
        return f"the run's own {name!r} model ({name}/ and the {name} unit)"
    if re.fullmatch(rf"{RANDOM_SPLIT_PREFIX}\d+", name):
        return (f"the random-split baseline's names ({RANDOM_SPLIT_PREFIX}0, {RANDOM_SPLIT_PREFIX}1, ...: "
                "its corpus domains, experts and units)")
    return None


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # ---- files at the top ----------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def forest(self) -> Path:
        return self.root / "forest.json"

    # ---- directories ---------------------------------------------------------------------
    @property
    def corpus(self) -> Path:
        """Links to the configured corpus domains, plus the random-split domains."""
        return self.root / "corpus"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def priors(self) -> Path:
        return self.root / "priors"

    @property
    def averages(self) -> Path:
        return self.root / "averages"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def cluster_model(self) -> Path:
        return self.clusters / "model"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def ablation(self) -> Path:
        """The expert-removal table of ``btm forest ablate`` (its heatmap: ``.png`` beside it)."""
        return self.results / "ablation.csv"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def records(self) -> Path:
        return self.root / "records"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def logs(self) -> Path:
        return self.jobs / "logs"

    @property
    def submitit(self) -> Path:
        """The slurm executor's submitit folder: submitted scripts, task pickles, job logs."""
        return self.jobs / "submitit"

    # ---- models --------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        """seed/, dense/, moe/ or experts/<name>/ (random-split experts included)."""
        if name in (SEED, DENSE, MOE):
            return self.root / name
        return self.root / "experts" / name

    def checkpoint(self, name: str) -> Path:
        """The checkpoint a model is used from once trained: ``checkpoint_last.pt``."""
        return self.model_dir(name) / "checkpoint_last.pt"

    def hf_import_of(self, name: str) -> Path:
        """The starting point of model ``name`` (the seed, dense) imported from model.init."""
        return self.model_dir(name) / "hf_import.pt"

    def average_dir(self, name: str) -> Path:
        return self.averages / name

    # ---- data ----------------------------------------------------------------------------
    def split_files(self, domains, splits=("train",)) -> list[Path]:
        """The binarized ``.bin``/``.idx`` of each (domain, split)."""
        return [self.data / d / f"{s}.{ext}" for d in domains for s in splits for ext in ("bin", "idx")]

    def record(self, stage: str, unit: str | None) -> Path:
        return self.records / (f"{stage}.{unit}.json" if unit else f"{stage}.json")

    def unit_lock(self, stage: str, unit: str | None) -> Path:
        """Held by the process running this unit (``btm stage``), so no second one races it."""
        return self.root / "locks" / (f"{stage}.{unit}.lock" if unit else f"{stage}.lock")

    def units_file(self, job: str) -> Path:
        return self.jobs / f"{job}.units.json"

    @property
    def submissions(self) -> Path:
        return self.jobs / "submissions.json"
