"""``btm fewshot``: the paper's few-shot tasks as one array over (task, seed, method).

The rendered array job is checked against a golden file, with ``bash -n`` and with fuzzed
paths; the element commands carry explicit indices into the manifest; and the same path (config
-> manifest -> one array job -> ``python -m launcher fewshot element``) really runs with the
local executor on the offline task ``btm_domain_fewshot`` and a real c-BTM run (fitted cluster
model, tiny real experts), ending in RUN/results/fewshot.* and ``btm report``. Nothing here
reaches the dataset hub: the six paper tasks are checked as lm-eval task configs only.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from conftest import CORPUS, REPO, require, run_btm
from golden_util import check_golden
from launcher.stages import fewshot
from launcher.contract.errors import BtmError
from launcher.profiles import load_profile
from launcher.sbatch import SbatchContext, format_tasks, submission

PAPER_TASKS = {"btm_fs_ag_news": 4, "btm_fs_amazon_polarity": 2, "btm_fs_dbpedia_14": 14,
               "btm_fs_financial_phrasebank": 3, "btm_fs_sst2": 2, "btm_fs_tweet_eval_offensive": 2}
RUN = Path("/scratch/runs/paper")


def paper_job(run_dir: Path = RUN, python="/opt/btm/.venv/bin/python", pythonpath="/opt/btm"):
    cfg = fewshot.load_config("paper")
    pending = fewshot.elements(cfg, run_dir)
    out_dir = run_dir / "fewshot" / cfg.name
    manifest, content = fewshot.write_manifest(out_dir, pending, write=False)
    profile = load_profile(cfg.profile)
    job = fewshot.fewshot_job([e["id"] for e in pending], profile)
    ctx = SbatchContext(run_dir=str(out_dir), run_name=cfg.name, array_parallelism=cfg.max_parallel,
                        python=python, pythonpath=pythonpath)
    index = {e["id"]: i for i, e in enumerate(pending)}
    sub = submission(job, profile, ctx, lambda job, unit: fewshot.element_argv(manifest, index[unit]))
    return cfg, pending, manifest, content, sub


def bash_n(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)


# ----------------------------------------------------------------------------- the config

def test_paper_config_is_six_tasks_eight_shots_five_seeds_in_one_array():
    cfg, pending, manifest, content, sub = paper_job()
    text = sub.script
    assert set(cfg.tasks) == set(PAPER_TASKS) and cfg.num_fewshot == 8 and len(set(cfg.seeds)) == 5
    assert len(pending) == 6 * 5 * len(cfg.methods) and len({e["id"] for e in pending}) == len(pending)
    assert {(e["task"], e["seed"], e["method"]) for e in pending} == {
        (t, s, m.label) for t in cfg.tasks for s in cfg.seeds for m in cfg.methods}
    assert text.count("#SBATCH --array=") == 1 and f"#SBATCH --array=0-{len(pending) - 1}%32" in text
    # the manifest lists exactly the array's elements, each knowing its own index
    assert [e["index"] for e in content["elements"]] == list(range(len(pending)))
    for e in content["elements"]:
        assert e["num_fewshot"] == 8 and e["results_run_dir"] == str(RUN)
        args = e["model_args"]
        assert args.get("forest") == str(RUN) or args.get("checkpoint") == str(RUN / "dense" / "checkpoint_last.pt")


def test_paper_task_files_are_lm_eval_tasks_with_the_right_label_sets():
    cfg = fewshot.load_config("paper")
    for name, n_labels in PAPER_TASKS.items():
        data = yaml.safe_load((Path(cfg.include_path[0]) / f"{name}.yaml").read_text())
        assert data["task"] == name and data["num_fewshot"] == 8 and data["output_type"] == "multiple_choice"
        assert len(data["doc_to_choice"]) == n_labels and data["dataset_path"]
        assert data["fewshot_split"] in ("train",) and data["test_split"]
    import importlib.util

    require(importlib.util.find_spec("lm_eval") is not None, "lm-eval is not installed")
    from fairseq_ext.hf_compat import hide_broken_torchaudio

    hide_broken_torchaudio()
    from lm_eval.tasks import TaskManager

    known = set(TaskManager(include_path=cfg.include_path).all_tasks)  # indexing reads no dataset
    assert set(PAPER_TASKS) <= known


@pytest.mark.parametrize("bad, match", [
    ({"tasks": []}, "tasks must be a non-empty list"),
    ({"seeds": [1, "two"]}, "seeds must be a non-empty list of integers"),
    ({"num_fewshot": -1}, "num_fewshot must be an integer >= 0"),
    ({"methods": {"d": {"checkpoint": "dense.pt"}}}, "say what it is with results_method"),
    ({"sedes": [1]}, "unknown key 'sedes'; did you mean 'seeds'"),
    ({"include_path": "nowhere"}, "task directory .*nowhere does not exist"),
    ({"limit": 0}, "limit must be a positive number"),
])
def test_bad_configs_name_file_key_and_value(tmp_path, bad, match):
    data = {"name": "x", "tasks": ["t"], "seeds": [1], "num_fewshot": 8, "methods": {"m": {"method": "uniform"}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**data, **bad}))
    with pytest.raises(BtmError, match=match) as e:
        fewshot.load_config(str(path))
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- rendering

def test_golden_fewshot_array_script():
    """The script sbatch receives, and the element command each task's pickled payload runs."""
    _, pending, manifest, _, sub = paper_job()
    assert bash_n(sub.script).returncode == 0
    check_golden("sbatch_fewshot_paper.sh", sub.script)
    assert sub.task_argvs == [["fewshot", "element", str(manifest), "--index", str(i)] for i in range(len(pending))]
    # the manifest's name hashes absolute paths of this checkout (include_path): not golden
    check_golden("sbatch_fewshot_paper.tasks", re.sub(r"manifest-[0-9a-f]{12}", "manifest-HASH", format_tasks(sub)))


_value = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\x7f"), min_size=1,
                 max_size=30)


@settings(max_examples=40, deadline=None)
@given(run_dir=_value, python=_value)
def test_fuzzed_paths_stay_quoted(run_dir, python):
    _, _, manifest, _, sub = paper_job(Path("/x") / run_dir, python=python, pythonpath=run_dir)
    assert bash_n(sub.script).returncode == 0, sub.script
    command = [ln for ln in sub.script.split("\n") if ln.startswith("exec ")][0]
    argv = shlex.split(command)
    assert argv[1] == python and argv[-1] == str(Path("/x") / run_dir / "fewshot" / "paper-fewshot" / "jobs" / "submitit")
    assert sub.task_argvs[0] == ["fewshot", "element", str(manifest), "--index", "0"]


def test_submitted_elements_carry_explicit_indices_even_for_an_array_of_one(tmp_path):
    """submitit gives each element its own argv (and submits an array of one as a plain job,
    without SLURM_ARRAY_TASK_ID): every command names its index; index -> element id."""
    cfg = fewshot.load_config("paper")
    pending = fewshot.elements(cfg, tmp_path)
    for subset in (pending, pending[7:8]):
        manifest, content = fewshot.write_manifest(tmp_path, subset)
        index = {e["id"]: i for i, e in enumerate(subset)}
        for e in subset:
            argv = fewshot.element_argv(manifest, index[e["id"]])
            assert argv[:3] == ["fewshot", "element", str(manifest)] and argv[3] == "--index"
            got_manifest, got = fewshot.read_element(manifest, int(argv[4]))
            assert got["id"] == e["id"] and got["index"] == int(argv[4])
    assert len(list(tmp_path.glob("manifest-*.json"))) == 2  # one manifest per submission, by content


def test_element_index_errors(tmp_path, monkeypatch, capsys):
    from launcher.cli import main

    cfg = fewshot.load_config("paper")
    manifest, _ = fewshot.write_manifest(tmp_path, fewshot.elements(cfg, tmp_path)[:2])
    assert main(["fewshot", "element", str(manifest), "--index", "2"]) == 2
    assert f"element index 2 is outside {manifest} (2 elements)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- result rows

@pytest.mark.parametrize("args, n, want", [
    ({"checkpoint": "d.pt"}, 1, dict(method="dense", k=1, routing="none", prior="none")),
    ({"method": "cluster", "routing": "prompt", "top_k": 4}, 2,
     dict(method="cbtm_cluster", k=2, routing="prompt:tfidf-svd(T=0.1)", prior="none", n_clusters=2)),
    ({"method": "cluster", "temperature": 0.5}, 8,
     dict(method="cbtm_cluster", k=8, routing="token:tfidf-svd(T=0.5,stride=32)", prior="none", n_clusters=8)),
    ({"method": "posterior", "routing": "prompt", "top_k": 2}, 3,
     dict(method="ensemble_posterior", k=2, routing="prompt:posterior", prior="uniform")),
    ({"method": "prior", "prior": "/r/priors/legal.abc.json", "top_k": 1}, 3,
     dict(method="topk_prior", k=1, routing="fixed", prior="legal.abc.json")),
    ({"method": "uniform"}, 3, dict(method="ensemble_uniform", k=3, routing="fixed", prior="none")),
    ({"method": "expert", "expert": "legal"}, 1, dict(method="expert:legal", k=1, routing="none", prior="none")),
    ({"method": "average", "prior": "0.2:0.8"}, 2,
     dict(method="average_posterior", k=2, routing="none", prior="0.2:0.8")),
])
def test_describe_method(args, n, want):
    results_method = "dense" if "checkpoint" in args else None
    got = fewshot.describe_method(args, results_method, n, n if args.get("method") == "cluster" else None)
    assert {k: v for k, v in got.items() if v is not None} == want


def test_rows_from_lm_eval_results_dict(tmp_path):
    from launcher.contract.results import append_fewshot, read_fewshot

    results = {"results": {"t": {"alias": "t", "acc,none": 0.75, "acc_stderr,none": 0.1,
                                 "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A",
                                 "word_perplexity,none": 12.5, "word_perplexity_stderr,none": "N/A"}},
               "n-samples": {"t": {"original": 100, "effective": 4}},
               "higher_is_better": {"t": {"acc": True, "acc_norm": True, "word_perplexity": False}}}
    element = {"run": "r", "task": "t", "num_fewshot": 8, "seed": 3}
    described = fewshot.describe_method({"method": "cluster", "routing": "prompt", "top_k": 1}, None, 4, 4)
    rows = fewshot.rows_from_lm_eval(results, element, described, forward_passes=32, seconds=2.0)
    by_metric = {r["metric"]: r for r in rows}
    assert set(by_metric) == {"acc", "acc_norm", "word_perplexity"}
    assert by_metric["acc"]["value"] == 0.75 and by_metric["acc"]["stderr"] == 0.1
    assert by_metric["acc_norm"]["stderr"] is None and by_metric["word_perplexity"]["better"] == "lower"
    assert all(r["samples"] == 4 and r["k"] == 1 and r["n_clusters"] == 4 and r["filter"] == "none" for r in rows)
    table = append_fewshot(tmp_path, rows)
    assert len(table) == 3 and read_fewshot(tmp_path).equals(table)


# ----------------------------------------------------------------------------- the local run

@pytest.mark.fairseq
def test_local_config_runs_the_same_path_end_to_end(cbtm_run):
    """examples/fewshot/local.yaml on a real c-BTM run with the local executor: one array job,
    each element a `python -m launcher fewshot element MANIFEST --index I` subprocess."""
    import importlib.util

    require(CORPUS.is_dir(), f"development corpus not found at {CORPUS}")
    require(importlib.util.find_spec("lm_eval") is not None, "lm-eval is not installed")
    from launcher.contract.results import read_fewshot

    meta = json.dumps({"corpus": str(CORPUS)})
    proc = run_btm("fewshot", "run", "local", "--run-dir", cbtm_run, "--metadata", meta, "--no-progress",
                   cwd=REPO, timeout=900)
    out_dir = cbtm_run / "fewshot" / "local-fewshot"
    logs = "\n".join(p.read_text()[-2000:] for p in (out_dir / "jobs" / "logs").glob("*.log"))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs
    assert "2 seed(s) x 2 method(s) = 4 elements; 0 done, 4 to run" in proc.stdout
    table = read_fewshot(cbtm_run).sort_values(["method", "seed"]).reset_index(drop=True)
    assert len(table) == 4 and set(table["task"]) == {"btm_domain_fewshot"} and set(table["metric"]) == {"acc"}
    assert table["method"].tolist() == ["cbtm_cluster", "cbtm_cluster", "ensemble_uniform", "ensemble_uniform"]
    assert table["seed"].tolist() == [1, 2, 1, 2] and set(table["num_fewshot"]) == {8}
    assert table["k"].tolist() == [1, 1, 3, 3] and table["samples"].tolist() == [2, 2, 2, 2]
    assert table["routing"].tolist()[:2] == ["prompt:tfidf-svd(T=0.1)"] * 2
    # 2 documents x 8 options (the corpus domains) x k experts
    assert table["expert_forward_passes"].tolist() == [16, 16, 48, 48]
    assert all(v in (0.0, 0.5, 1.0) for v in table["value"])
    for row in table.itertuples():  # each row is its element's lm_eval result
        label = "cbtm_top1" if row.method == "cbtm_cluster" else "uniform"
        saved = json.loads((out_dir / "elements" / f"btm_domain_fewshot.s{row.seed}.{label}.json").read_text())
        assert saved["lm_eval"]["results"]["btm_domain_fewshot"]["acc,none"] == row.value
        assert saved["lm_eval"]["n-shot"]["btm_domain_fewshot"] == 8
    assert len(list(out_dir.glob("manifest-*.json"))) == 1

    again = run_btm("fewshot", "run", "local", "--run-dir", cbtm_run, "--metadata", meta, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "4 done, 0 to run" in again.stdout and "nothing to do" in again.stdout

    report = run_btm("report", cbtm_run, cwd=REPO, timeout=300)
    assert report.returncode == 0, report.stderr
    md = (cbtm_run / "report" / "report.md").read_text()
    assert "## Few-shot tasks" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| task metric"))
    assert "c-BTM 3 clusters top-1" in header and "Ensemble uniform" in header
    assert any(ln.startswith("| btm_domain_fewshot acc |") for ln in md.splitlines())


from test_lm_eval_routing import cbtm_run  # noqa: E402,F401  (the c-BTM run fixture)
from eval_fixtures import tiny_data  # noqa: E402,F401


@pytest.mark.parametrize("n_seeds", [1, 3])
def test_slurm_submission_is_one_sbatch_with_explicit_indices(tmp_path, n_seeds):
    """With a stand-in sbatch: one sbatch call for the whole array; every element's pickled
    payload names its manifest index, also for an array of one (which submitit submits as a
    plain job, without SLURM_ARRAY_TASK_ID)."""
    import pickle

    from test_pipeline_slurm import fake_slurm_env

    env = fake_slurm_env(tmp_path)
    cfg = tmp_path / "fs.yaml"
    cfg.write_text(yaml.safe_dump({"name": "fs", "tasks": ["btm_domain_fewshot"], "seeds": list(range(n_seeds)),
                                   "num_fewshot": 8, "include_path": str(REPO / "tests" / "lm_eval_tasks"),
                                   "methods": {"uniform": {"method": "uniform"}},
                                   "executor": "slurm", "profile": "slurm-test"}))
    run = tmp_path / "run"
    run.mkdir()
    r = run_btm("fewshot", "run", cfg, "--run-dir", run, env=env, check=True)
    assert f"submitted {n_seeds} elements as one array" in r.stdout
    scripts = list((tmp_path / "sbatch").glob("*.sh"))
    assert len(scripts) == 1
    assert ("#SBATCH --array=0-2%3" in scripts[0].read_text()) == (n_seeds == 3)
    out_dir = run / "fewshot" / "fs"
    (manifest,) = out_dir.glob("manifest-*.json")
    elements = json.loads(manifest.read_text())["elements"]
    payloads = sorted(out_dir.glob("jobs/submitit/*_submitted.pkl"))
    assert len(payloads) == n_seeds
    got = {}
    for p in payloads:
        with p.open("rb") as f:
            argv = pickle.load(f).args[0]
        assert argv[:3] == ["fewshot", "element", str(manifest)] and argv[3] == "--index"
        got[int(argv[4])] = argv
    assert sorted(got) == list(range(n_seeds))
    assert [e["id"] for e in elements] == [f"btm_domain_fewshot.s{s}.uniform" for s in range(n_seeds)]
    ledger = json.loads((out_dir / "jobs" / "submissions.json").read_text())
    assert ledger[0]["units"] == [e["id"] for e in elements]
    assert ledger[0]["array"] == (n_seeds > 1)  # submitit submits an array of one as a plain job


def test_dry_run_needs_neither_torch_nor_lm_eval(tmp_path):
    """`btm fewshot run --dry-run` on a login node: launcher imports only light packages."""
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'fairseq', 'lm_eval', 'transformers', 'sentencepiece'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from launcher.cli import main\n"
        f"sys.exit(main(['fewshot', 'run', 'paper', '--run-dir', {str(tmp_path)!r}, '--dry-run']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-119%32" in proc.stdout and not (tmp_path / "fewshot").exists()
