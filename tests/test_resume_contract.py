"""The resume contract and damaged derived files (issue 17, classes 1 and 3), on one real
finished tiny run with a MoE (every stage of the registry but c-BTM's three cluster stages,
which run on their own c-BTM run directory: data and cluster stages only).

- Every input a stage's record lists makes the stage stale when it changes, and the records
  list what the stage reads (data splits, score caches, checkpoints, forest.json, the config
  keys as typed params).
- The issue's example through the real CLI: a domain's test split edited after a finished run;
  `btm run` again re-scores and re-evaluates, and results.csv holds the new numbers.
- Each damaged derived file is rebuilt by `btm run` with a warning, or refused with an error
  that names the command that fixes it.

Each test works on its own copy of the finished run directory.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import require_fairseq, run_btm, write_small_corpus
from launcher.stages import STAGES

pytestmark = [pytest.mark.fairseq, pytest.mark.slow]

CONFIG = textwrap.dedent("""\
    name: contract
    method: btm
    corpus: {{path: {corpus}, vocab_size: 400}}
    domains: {{train: [bible, legal], eval: [bible, legal], incremental: [code_python]}}
    model: {{preset: tiny}}
    budget: {{total_updates: 8, gpus: 1, seed_fraction: 0.5, save_interval_updates: 4}}
    branching: {{rule: posterior, top_k: 2, sample_docs: 4}}
    evaluation: {{split: test, methods: [experts, ensemble_posterior, average_uniform]}}
    moe: {{enabled: true, budget_share: 0.25, top_k: 2}}
    baselines: [dense]
    executor: local
    profile: local
    max_parallel: 1
    """)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(config file, corpus, run dir) of a finished run; tests copy the run dir."""
    require_fairseq()
    root = tmp_path_factory.mktemp("contract")
    corpus = write_small_corpus(root / "corpus", ["bible", "legal", "code_python"],
                                {"train": 30, "valid": 6, "test": 6})
    cfg = root / "contract.yaml"
    cfg.write_text(CONFIG.format(corpus=corpus))
    run_dir = root / "run"
    r = run_btm("run", cfg, "--run-dir", run_dir, "--no-progress", timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    return cfg, corpus, run_dir


@pytest.fixture(scope="module")
def clustered(finished, tmp_path_factory):
    """A c-BTM run dir whose data and cluster stages ran (`btm stage`): the cluster stages are
    the stages of the registry the btm run above does not have."""
    _, corpus, _ = finished
    run_dir = tmp_path_factory.mktemp("cbtm") / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(CONFIG.format(corpus=corpus).replace("method: btm", "method: cbtm")
                                         .replace(", incremental: [code_python]", "")
                                         + "clusters: {k: 2}\n")
    for stage, unit in (("data_plan", None), ("data_shard", "t0"), ("data", None), ("cluster_fit", None),
                        ("cluster_assign", "s0"), ("cluster", None)):
        run_btm("stage", run_dir, stage, *(["--unit", unit] if unit else []), check=True, timeout=900)
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path):
    cfg, corpus, run_dir = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    return cfg, corpus, copy


def _units(run_dir: Path):
    """(stage, unit, its record) of every unit of the run's pipeline."""
    from launcher.records import read_record
    from launcher.stages import STAGES, load_run_config

    cfg = load_run_config(run_dir)
    return [(stage, unit, read_record(run_dir, stage.name, unit.name))
            for stage in STAGES if stage.enabled(cfg) for unit in stage.units(cfg)]


def _done(run_dir: Path, stage: str, unit) -> bool:
    from launcher.records import HashCache, is_done

    return is_done(run_dir, stage, unit, HashCache(run_dir))


@pytest.mark.parametrize("stage_name", [s.name for s in STAGES])
def test_every_recorded_input_makes_its_stage_rerun(request, tmp_path, stage_name):
    """Change each file a stage's record lists as input: the unit is no longer done (`btm run`
    plans it again); put it back: done again. And the records list what the stage reads."""
    cbtm = stage_name in ("cluster_fit", "cluster_assign", "cluster")
    source = request.getfixturevalue("clustered") if cbtm else request.getfixturevalue("finished")[2]
    run_dir = shutil.copytree(source, tmp_path / "run", symlinks=True)
    units = [(u, rec) for s, u, rec in _units(run_dir) if s.name == stage_name]
    assert units, f"the test run has no {stage_name} unit"
    for unit, record in units:
        assert record is not None and _done(run_dir, stage_name, unit), (stage_name, unit.name)
        assert record["inputs"], f"{stage_name} {unit.name} records no input"
        for rel in record["inputs"]:
            path = Path(rel) if Path(rel).is_absolute() else run_dir / rel
            if not path.is_relative_to(run_dir) and stage_name not in ("data_plan", "data_incremental"):
                continue  # only the data stages read the corpus (kept outside the run)
            original = path.read_bytes()
            try:
                path.write_bytes(original + b"\n")
                assert not _done(run_dir, stage_name, unit), f"{stage_name} {unit.name}: {rel} changed"
            finally:
                path.write_bytes(original)
        assert _done(run_dir, stage_name, unit)
    _expected_inputs(stage_name, units)


def _expected_inputs(stage_name: str, units) -> None:
    """What each stage reads appears among its recorded inputs (or, for config keys, params)."""
    for unit, record in units:
        ins = set(record["inputs"])
        if stage_name == "eval":
            assert {"forest.json", "data/bible/test.bin", "data/legal/test.idx", "data/legal/valid.bin",
                    "experts/bible/checkpoint_last.pt", "experts/code_python/checkpoint_last.pt",
                    "dense/checkpoint_last.pt"} <= ins, sorted(ins)
            assert any(p.startswith("scores/") and p.endswith(".npz") for p in ins), sorted(ins)
            assert record["params"]["run"] == "contract" and record["params"]["top_k"] >= 0
        if stage_name == "score":
            assert f"data/bible/{record['params']['splits'][0]}.bin" in ins
        if stage_name in ("train", "grow") and unit.params["init"] == "seed":
            assert "seed/checkpoint_last.pt" in ins
        if stage_name == "grow":
            assert "experts/bible/checkpoint_last.pt" in ins
        if stage_name == "merge":
            assert "experts/bible/branch.json" in ins and record["kept"] == ["forest.json"]
        if stage_name == "data_plan":
            assert isinstance(record["params"]["seed"], int) and any(p.endswith("bible/test.jsonl") for p in ins)
        if stage_name in ("data_shard", "data"):
            assert "data/shards.json" in ins and "data/spm.model" in ins
        if stage_name == "moe":  # not forest.json: grow edits it after merge
            assert {"experts/bible/checkpoint_last.pt", "data/legal/train.bin"} <= ins, sorted(ins)
        if stage_name in ("cluster_fit", "cluster"):
            assert any(p.endswith("legal/train.jsonl") for p in ins), sorted(ins)
        if stage_name == "cluster_fit":
            assert any(p.startswith("clusters/model/") for p in record["outputs"]), sorted(record["outputs"])
        if stage_name == "report":
            assert "results/results.csv" in ins


def _results(run_dir: Path):
    import pandas as pd

    return pd.read_csv(run_dir / "results" / "results.csv", keep_default_na=False)


def test_an_edited_test_split_is_rescored_and_reevaluated(finished, tmp_path):
    """The issue's example: after a finished run, edit a domain's test split and run again:
    data, score and eval run again and results.csv holds the new numbers."""
    cfg, corpus, run_dir = finished
    run_dir = shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    before = _results(run_dir)
    finished_at = {rec.name: json.loads(rec.read_text())["finished"] for rec in (run_dir / "records").glob("[!.]*.json")}
    test_file = corpus / "legal" / "test.jsonl"
    original = test_file.read_bytes()
    try:
        rows = original.decode().splitlines()
        test_file.write_text("\n".join(rows[:3]) + "\n")  # half of the documents
        r = run_btm("run", cfg, "--run-dir", run_dir, "--no-progress", timeout=900)
    finally:
        test_file.write_bytes(original)
    assert r.returncode == 0, r.stdout + r.stderr
    again = {rec.name for rec in (run_dir / "records").glob("[!.]*.json")
             if json.loads(rec.read_text())["finished"] != finished_at.get(rec.name)}
    assert {"data.json", "score.legal.json", "score.dense.json", "eval.json", "report.json"} <= again, again
    assert not {"seed.json", "train.legal.json", "dense.json", "merge.json"} & again, again
    after = _results(run_dir)
    key = ["method", "eval_domain", "split"]
    old, new = before.set_index(key), after.set_index(key)
    legal = [k for k in new.index if k[1] == "legal"]
    assert legal and all(new.loc[k, "tokens"] < old.loc[k, "tokens"] for k in legal)
    bible = [k for k in new.index if k[1] == "bible"]
    assert all(new.loc[k, "tokens"] == old.loc[k, "tokens"] for k in bible)
    assert len(after) == len(before)  # replaced, not appended


def test_a_truncated_score_cache_is_rescored_with_a_warning(run_copy):
    cfg, _, run_dir = run_copy
    record = json.loads((run_dir / "records" / "score.legal.json").read_text())
    cache = run_dir / next(p for p in record["outputs"] if "legal.test." in p)
    cache.write_bytes(cache.read_bytes()[:100])
    r = run_btm("run", cfg, "--run-dir", run_dir, "--no-progress", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = "".join(p.read_text() for p in (run_dir / "jobs" / "logs").glob("*.log"))
    assert "BadZipFile" in logs and "scoring again" in logs and "Traceback" not in logs
    import numpy as np

    with np.load(cache) as z:
        assert len(z["logprobs"]) > 0


def test_a_deleted_forest_is_merged_again(run_copy):
    cfg, _, run_dir = run_copy
    names = [e["name"] for e in json.loads((run_dir / "forest.json").read_text())["experts"]]
    (run_dir / "forest.json").unlink()
    r = run_btm("run", cfg, "--run-dir", run_dir, "--no-progress", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = "".join(p.read_text() for p in (run_dir / "jobs" / "logs").glob("*.log"))
    assert logs.count("merge: done") == 2  # the first run's and this one's
    assert sorted(e["name"] for e in json.loads((run_dir / "forest.json").read_text())["experts"]) == sorted(names)
    assert run_btm("forest", "verify", run_dir).returncode == 0


def test_a_truncated_forest_is_refused_naming_the_fix(run_copy):
    cfg, _, run_dir = run_copy
    forest = run_dir / "forest.json"
    forest.write_text(forest.read_text()[:50])
    r = run_btm("forest", "list", run_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(forest) in r.stderr and "delete it and run `btm run` again" in r.stderr
    forest.unlink()  # the fix it names
    assert run_btm("run", cfg, "--run-dir", run_dir, "--no-progress", timeout=900).returncode == 0
    assert run_btm("forest", "verify", run_dir).returncode == 0


def test_a_truncated_results_csv_is_refused_by_report_and_rebuilt_by_run(run_copy, tmp_path):
    cfg, _, run_dir = run_copy
    csv = run_dir / "results" / "results.csv"
    rows = len(_results(run_dir))
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:3]))
    r = run_btm("report", run_dir, "--out", tmp_path / "report")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{csv} holds 2 rows" in r.stderr and f"rm {csv}" in r.stderr
    r = run_btm("run", cfg, "--run-dir", run_dir, "--no-progress", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = "".join(p.read_text() for p in (run_dir / "jobs" / "logs").glob("*.log"))
    assert "holds 2 rows" in logs and "rewriting it" in logs
    assert len(_results(run_dir)) == rows
    assert run_btm("report", run_dir, "--out", tmp_path / "report").returncode == 0


def test_a_deleted_expert_checkpoint_is_retrained_without_duplicate_log_rows(run_copy):
    cfg, _, run_dir = run_copy
    expert = run_dir / "experts" / "legal"
    rows = (expert / "train_log.jsonl").read_text().splitlines()
    (expert / "checkpoint_last.pt").unlink()
    r = run_btm("run", cfg, "--run-dir", run_dir, "--no-progress", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    again = (expert / "train_log.jsonl").read_text().splitlines()
    assert len(again) == len(rows)
    assert [json.loads(x)["update"] for x in again] == [json.loads(x)["update"] for x in rows]
