"""The local executor (dependencies, failures, requeue, worker bound), the run lock, and the
whole tiny pipeline end to end once the model/data/eval parts are on main."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, require, require_fairseq, run_btm
from launcher.executors.local import LocalExecutor
from launcher.plan import Job, Unit


def _job(name, units=(None,), after_ok=(), after_any=(), array=False):
    return Job(name=name, stage=name, units=[Unit(u) for u in units], array=array,
               after_ok=list(after_ok), after_any=list(after_any))


def _trivial(tmp_path, behaviour: dict):
    """A command per unit: append "start/end <job>.<unit> <time>" to a log; exit per `behaviour`."""
    log = tmp_path / "events.txt"

    def command(job, unit):
        key = f"{job.name}.{unit}"
        code = behaviour.get(key, 0)
        script = textwrap.dedent(f"""
            import sys, time, os
            def w(s):
                with open({str(log)!r}, "a") as f: f.write(s + "\\n")
            w("start {key} %f" % time.time())
            time.sleep(0.2)
            marker = {str(tmp_path)!r} + "/preempted.{key}"
            code = {code}
            if code == 3 and os.path.exists(marker):
                code = 0  # resumed after the requeue
            if code == 3:
                open(marker, "w").close()
            w("end {key} %f" % time.time())
            sys.exit(code)
        """)
        return [sys.executable, "-c", script]

    return command, log


def _events(log):
    out = []
    for line in log.read_text().splitlines():
        kind, key, t = line.split()
        out.append((kind, key, float(t)))
    return out


def test_dependencies_failure_isolation_and_requeue(tmp_path):
    jobs = [_job("data"), _job("train", ["a", "b", "c"], after_ok=["data"], array=True),
            _job("merge", after_any=["train"]), _job("score", ["x"], after_ok=["merge"]),
            _job("eval", after_ok=["train"])]
    command, log = _trivial(tmp_path, {"train.b": 1, "train.c": 3})
    result = LocalExecutor(tmp_path, max_workers=2, command_for=command, progress=False).run(jobs)
    ev = _events(log)
    t = {(k, key): ts for k, key, ts in ev}
    # train tasks start after data ended; merge waits for every train task (afterany) despite b failing
    for u in "abc":
        assert t[("start", f"train.{u}")] >= t[("end", "data.None")]
    assert t[("start", "merge.None")] >= max(t[("end", f"train.{u}")] for u in "abc")
    assert ("start", "score.x") in t  # merge succeeded
    assert not any(key == "eval.None" for _, key, _ in ev)  # afterok on a failed array: cancelled
    by = {(u.job, u.unit): u for u in result.units}
    assert by[("train", "b")].returncode == 1 and by[("train", "a")].returncode == 0
    assert by[("train", "c")].returncode == 0 and by[("train", "c")].attempts == 2  # requeued once
    assert by[("eval", None)].returncode is None
    assert {(u.job, u.unit) for u in result.failed} == {("train", "b"), ("eval", None)}
    # never more than 2 units at once
    running, peak = 0, 0
    for kind, _, _ in sorted(ev, key=lambda e: e[2]):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak <= 2


def test_lock_refuses_a_second_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from launcher.lock import run_lock
        with run_lock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from launcher.contract.errors import BtmError
        from launcher.lock import run_lock

        with pytest.raises(BtmError, match="another btm process is running"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    from launcher.lock import run_lock

    with run_lock(tmp_path):  # released when the holder died
        pass


@pytest.mark.slow
@pytest.mark.fairseq
def test_tiny_pipeline_end_to_end_then_incremental(tmp_path):
    """tiny (3 experts) with the local executor, its data in shards of 10 KB binarized by an
    array of 3 tasks; a second run submits nothing; adding a fourth domain trains only it,
    branched from the posterior-weighted top-2 experts."""
    require_fairseq()
    import importlib.util

    from conftest import write_small_corpus

    for mod in ("fairseq_ext.data_prep", "fairseq_ext.train", "fairseq_ext.branch", "fairseq_ext.scoring",
                "fairseq_ext.evaluate", "analysis.report"):
        require(importlib.util.find_spec(mod) is not None, f"{mod} is not on this branch yet")
    corpus = write_small_corpus(tmp_path / "corpus", ["bible", "code_python", "legal", "fiction"],
                                {"train": 60, "valid": 8, "test": 8})
    run_dir = tmp_path / "run"
    sharded = tmp_path / "tiny.yaml"
    sharded.write_text((REPO / "launcher" / "configs" / "tiny.yaml").read_text().replace(
        "  vocab_size: 500\n", "  vocab_size: 500\n  shard_mb: 0.01\n  shard_tasks: 3\n"))
    r = run_btm("run", sharded, "--run-dir", run_dir, "--corpus", corpus, "--no-progress", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["datasets"]["legal/train"]["shards"] > 3
    tasks = [json.loads((run_dir / "records" / f"data_shard.t{k}.json").read_text()) for k in range(3)]
    assert all(t["shards"] > 0 for t in tasks), tasks
    forest = json.loads((run_dir / "forest.json").read_text())
    assert [e["name"] for e in forest["experts"]] == ["bible", "code_python", "legal"]
    assert all(e["parents"] == {"seed": 1.0} and e["updates"] == 12 for e in forest["experts"])
    assert "ensemble_posterior" in r.stdout and "report:" in r.stdout
    for name in ("data_plan", "data", "seed", "train.bible", "merge", "score.legal", "eval", "report"):
        assert (run_dir / "records" / f"{name}.json").is_file()
    again = run_btm("run", sharded, "--run-dir", run_dir, "--corpus", corpus, "--no-progress")
    assert again.returncode == 0 and "jobs to submit: 0" in again.stdout
    assert run_btm("forest", "verify", run_dir).returncode == 0

    before = {n: (run_dir / "experts" / n / "checkpoint_last.pt").stat().st_mtime_ns for n in ("bible", "legal")}
    grown = tmp_path / "grown.yaml"
    text = sharded.read_text()
    grown.write_text(text.replace("train: [bible, code_python, legal]", "train: [bible, code_python, legal, fiction]"))
    r = run_btm("run", grown, "--run-dir", run_dir, "--corpus", corpus, "--no-progress", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "adding fiction to the existing forest" in r.stdout and "grow units: fiction" in r.stdout
    forest = json.loads((run_dir / "forest.json").read_text())
    fiction = next(e for e in forest["experts"] if e["name"] == "fiction")
    assert 1 <= len(fiction["parents"]) <= 2 and set(fiction["parents"]) <= {"bible", "code_python", "legal"}
    assert abs(sum(fiction["parents"].values()) - 1) < 1e-6
    assert {n: (run_dir / "experts" / n / "checkpoint_last.pt").stat().st_mtime_ns for n in before} == before
    assert "expert:fiction" in r.stdout
    assert "jobs to submit: 0" in run_btm("run", grown, "--run-dir", run_dir, "--corpus", corpus).stdout


def test_relative_run_dir_and_corpus_reach_stages_as_absolute_paths(tmp_path):
    """Stage commands run inside the run directory; a relative --run-dir/--corpus typed by the
    user (the README's `btm run --demo` uses the relative default btm-demo) must still work."""
    from conftest import run_btm, write_small_corpus
    import yaml

    write_small_corpus(tmp_path / "corpus", ["bible", "code_python", "legal"], {"train": 2, "valid": 1, "test": 1})
    r = run_btm("run", "tiny", "--run-dir", "runs/rel", "--corpus", "corpus", "--dry-run", cwd=tmp_path,
                check=True)
    assert f"run directory: {tmp_path.resolve()}/runs/rel" in r.stdout
    # What matters is where the stages looked: no stage log may name a doubled run directory.
    # The corpus is enough for the whole pipeline to run; one training domain still runs every
    # stage of it (data, seed, train, merge, score, eval, report) with fewer units.
    run_btm("run", "tiny", "--run-dir", "runs/rel", "--corpus", "corpus", "--no-progress",
            "--set", "domains.train=[bible]", cwd=tmp_path, timeout=600)
    assert (tmp_path / "runs" / "rel" / "records" / "report.json").is_file()  # every stage ran
    saved = yaml.safe_load((tmp_path / "runs" / "rel" / "config.yaml").read_text())
    assert saved["corpus"]["path"] == str((tmp_path / "corpus").resolve())
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / "rel" / "jobs" / "logs").glob("*.log"))
    assert "runs/rel/runs/rel" not in logs and "is not a btm run directory" not in logs
