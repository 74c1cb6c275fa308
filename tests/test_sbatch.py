"""What the slurm executor submits: golden scripts and per-task commands, the executor writing
exactly that script through submitit, `bash -n` on every script, quoting of fuzzed values."""
from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from golden_util import check_golden
from launcher.config import load_config
from launcher.contract.errors import BtmError
from launcher.contract.layout import RunLayout
from launcher.plan import build_plan
from launcher.profiles import Profile, load_profile, parse_profile
from launcher.sbatch import SbatchContext, format_tasks, render_sbatch, submission

CTX = dict(run_dir="/scratch/runs/paper", run_name="paper-125m", array_parallelism=8,
           dependency_ids={"data": "1001", "seed": "1002", "train": "1003", "merge": "1004", "dense": "1005",
                           "score": "1006", "eval": "1007"},
           python="/opt/btm/.venv/bin/python", pythonpath="/opt/btm")


def _plan(corpus, name="paper-125m", profile="gpu-cluster-example"):
    cfg = load_config(name, corpus=corpus)
    return build_plan(cfg, load_profile(profile), CTX["run_dir"])


def _exec_argv(text: str) -> list[str]:
    """The batch shell's one command, after ``exec``."""
    return shlex.split([ln for ln in text.split("\n") if ln.startswith("exec ")][0])[1:]


def bash_n(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)


@pytest.mark.parametrize("job", ["data_plan", "data_shard", "data", "seed", "train", "dense", "merge", "score", "eval", "report"])
def test_golden_paper_125m(job, paper_corpus):
    """The script sbatch receives and, beside it, the argv each task's pickled payload runs."""
    plan = _plan(paper_corpus)
    sub = submission(plan.job(job), plan.profile, SbatchContext(**CTX))
    check_golden(f"sbatch_paper-125m_{job}.sh", sub.script)
    check_golden(f"sbatch_paper-125m_{job}.tasks", format_tasks(sub))
    assert bash_n(sub.script).returncode == 0


def test_train_is_one_array_with_preemption_settings(paper_corpus):
    plan = _plan(paper_corpus)
    sub = submission(plan.job("train"), plan.profile, SbatchContext(**CTX))
    text = sub.script
    assert sub.array and "#SBATCH --array=0-15%8" in text
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR2@180" in text
    assert "#SBATCH --kill-on-invalid-dep=yes" in text
    assert "#SBATCH --dependency=afterok:1002" in text
    assert text.count("exec ") == 1
    # the batch shell becomes submitit's runner; each task's unit travels in its pickled argv
    assert _exec_argv(text) == ["/opt/btm/.venv/bin/python", "-u", "-m", "submitit.core._submit",
                                "/scratch/runs/paper/jobs/submitit"]
    assert len(sub.task_argvs) == 16 and sub.units == [u.name for u in plan.job("train").units]
    for unit, argv in zip(sub.units, sub.task_argvs):
        assert argv == ["stage", "/scratch/runs/paper", "train", "--unit", unit, "--nproc-per-node", "2"]
    merge = render_sbatch(plan.job("merge"), plan.profile, SbatchContext(**CTX))
    assert "#SBATCH --dependency=afterany:1003" in merge


def test_slurm_test_profile_renders_cpu_jobs(paper_corpus):
    plan = _plan(paper_corpus, "tiny", "slurm-test")
    text = render_sbatch(plan.job("train"), plan.profile, SbatchContext(**CTX))
    assert "gpus" not in text and "#SBATCH --array=0-2%2" not in text  # array_parallelism from ctx: 8
    assert "#SBATCH --array=0-2%3" in text and "#SBATCH --mem=1000M" in text


_value = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\x7f"), min_size=1, max_size=30)


_TINY = load_config("tiny")


@settings(max_examples=60, deadline=None)
@given(partition=_value, account=_value, qos=_value, constraint=_value, run_dir=_value, python=_value,
       mem=st.from_regex(r"[0-9]+[KMGT]?", fullmatch=True))  # any other mem is refused as not a size
def test_fuzzed_values_stay_quoted(partition, account, qos, constraint, mem, run_dir, python):
    profile = parse_profile({"partition": partition, "account": account, "qos": qos, "constraint": constraint,
                             "mem": mem}, "fuzz.yaml", "fuzz")
    plan = build_plan(_TINY, profile, "/r")
    ctx = SbatchContext(**{**CTX, "run_dir": "/x/" + run_dir, "python": python, "pythonpath": run_dir})
    for job in ("train",):
        text = render_sbatch(plan.job(job), profile, ctx)
        assert bash_n(text).returncode == 0, text
        flags = {}
        for line in text.split("\n"):  # not splitlines(): it also splits on \x85 and friends
            if line.startswith("#SBATCH --"):
                key, _, value = line[len("#SBATCH --"):].partition("=")
                flags[key] = shlex.split(value)[0] if value else True
        assert flags["partition"] == partition and flags["account"] == account
        assert flags["qos"] == qos and flags["constraint"] == constraint and flags["mem"] == mem
        argv = _exec_argv(text)
        assert argv[0] == python and argv[-1] == str(RunLayout("/x/" + run_dir).submitit)  # a path, normalized


@pytest.mark.parametrize("bad", [{"partition": "gpu\n#SBATCH --x"}, {"account": "a\tb"}, {"time": "1h"},
                                 {"extra_sbatch": ["--exclusive\n--x"]}, {"extra_sbatch": ["rm -rf /"]},
                                 {"partiton": "gpu"}, {"stages": {"train": {"gpus": 1}}}, {"stages": {"trian": {}}}])
def test_bad_profiles_are_rejected(bad):
    with pytest.raises(BtmError) as e:
        parse_profile(bad, "p.yaml", "p")
    assert "p.yaml" in str(e.value)


def test_extra_sbatch_lines_and_stage_overrides():
    prof = parse_profile({"gpus_per_node": 8, "extra_sbatch": ["--exclusive", "--mail-type=END"],
                          "stages": {"merge": {"cpus_per_task": 3}}}, "p.yaml", "p")
    plan = build_plan(load_config("tiny"), prof, "/r")
    text = render_sbatch(plan.job("merge"), prof, SbatchContext(**CTX))
    assert "#SBATCH --exclusive" in text and "#SBATCH --mail-type=END" in text
    assert "#SBATCH --cpus-per-task=3" in text
    assert dataclasses.replace(prof).for_stage("merge").cpus_per_task == 3


def test_cpus_and_memory_follow_the_gpus_so_four_experts_share_a_node(paper_corpus):
    """paper-125m on the example profile (8 GPUs, 10 CPUs and 60G per GPU): an expert holds 2 GPUs
    and asks for exactly a quarter of the node, so SLURM packs four on one node."""
    plan = _plan(paper_corpus)
    prof = plan.profile
    node_cpus, node_mem = prof.cpus_per_gpu * prof.gpus_per_node, 60 * prof.gpus_per_node
    train = submission(plan.job("train"), prof, SbatchContext(**CTX)).script
    assert "#SBATCH --gpus-per-node=2" in train
    assert f"#SBATCH --cpus-per-task={node_cpus // 4}" in train and f"#SBATCH --mem={node_mem // 4}G" in train
    seed = submission(plan.job("seed"), prof, SbatchContext(**CTX)).script
    assert f"#SBATCH --cpus-per-task={node_cpus}" in seed and f"#SBATCH --mem={node_mem}G" in seed
    # A stage's own cpus_per_task / mem win over the per-GPU amounts; jobs without GPUs take them.
    assert plan.job("score").cpus_per_task == 10 and plan.job("score").mem == "64G"
    assert plan.job("data").gpus_per_node == 0 and plan.job("data").mem == "64G"
    custom = parse_profile({"gpus_per_node": 4, "cpus_per_gpu": 3, "mem_per_gpu": "1500M", "mem": "2G",
                            "stages": {"train": {"mem_per_gpu": "7G"}, "seed": {"cpus_per_task": 5}}}, "p.yaml", "p")
    assert custom.cpus_and_mem("train", 2) == (6, "14G") and custom.cpus_and_mem("seed", 4) == (5, "6000M")
    assert custom.cpus_and_mem("merge", 0) == (1, "2G")


@pytest.mark.parametrize("bad", [{"mem_per_gpu": "60GB"}, {"mem_per_gpu": "1.5G"}, {"cpus_per_gpu": "10"},
                                 {"stages": {"train": {"mem_per_gpu": "lots"}}}])
def test_bad_per_gpu_resources_are_rejected(bad):
    with pytest.raises(BtmError) as e:
        parse_profile(bad, "p.yaml", "p")
    assert "p.yaml" in str(e.value) and "per_gpu" in str(e.value)


def test_training_jobs_span_nodes_up_to_max_nodes(paper_corpus):
    """A training job takes the budget's GPUs, a node's worth per node, on up to max_nodes nodes:
    the stage's command carries --nproc-per-node N (torchrun on one node) and --nodes M (srun
    tasks across the job's nodes); beyond max_nodes the job accumulates gradients."""
    plan = _plan(paper_corpus)  # paper-125m on 8-GPU nodes: experts 2 GPUs, seed and dense 16 = 2 nodes x 8
    ctx = SbatchContext(**CTX)
    for job, nodes, n in (("train", 1, 2), ("seed", 2, 8), ("dense", 2, 8)):
        sub = submission(plan.job(job), plan.profile, ctx)
        assert f"#SBATCH --nodes={nodes}" in sub.script and f"#SBATCH --gpus-per-node={n}" in sub.script
        tail = ["--nproc-per-node", str(n)] + (["--nodes", str(nodes)] if nodes > 1 else [])
        assert all(argv[-len(tail):] == tail for argv in sub.task_argvs), job
        assert ("export BTM_COLLECTIVE_TIMEOUT_S=600" in sub.script) == (nodes > 1)
    for job in ("score", "eval", "data", "merge"):  # one GPU or none: one process on one node
        sub = submission(plan.job(job), plan.profile, ctx)
        assert "#SBATCH --nodes=1" in sub.script and not any("--nproc-per-node" in a for a in sub.task_argvs)
    # 1.3b (128 GPUs): seed and dense on 16 nodes, not one node accumulating 16x; an expert's
    # share (16 GPUs) on 2 nodes.
    big = _plan(paper_corpus, "paper-1.3b")
    for job, nodes in (("seed", 16), ("dense", 16), ("train", 2)):
        assert big.job(job).nodes == nodes and big.job(job).gpus_per_node == 8, job
    # A profile that caps the nodes: the rest of the batch is gradient accumulation.
    capped = dataclasses.replace(load_profile("gpu-cluster-example"), max_nodes=4)
    seed = build_plan(big.config, capped, "/r").job("seed")
    assert seed.nodes == 4 and submission(seed, capped, ctx).task_argvs[0][-4:] == ["--nproc-per-node", "8", "--nodes", "4"]
    # A CPU profile: one training process per node (gloo), on up to max_nodes nodes.
    cpu = build_plan(load_config("tiny", {"budget.gpus": 2}), load_profile("slurm-test"), "/r").job("seed")
    assert (cpu.nodes, cpu.gpus_per_node) == (2, 0)
    assert submission(cpu, load_profile("slurm-test"), ctx).task_argvs[0][-2:] == ["--nodes", "2"]
    # Quoted like every other value: a run directory with a space stays one argument.
    spaced = submission(plan.job("train"), plan.profile, SbatchContext(**{**CTX, "run_dir": "/s/my run"}))
    assert bash_n(spaced.script).returncode == 0
    assert _exec_argv(spaced.script)[-1] == "/s/my run/jobs/submitit"
    assert spaced.task_argvs[0][:3] == ["stage", "/s/my run", "train"]


def test_the_stage_starts_torchrun_standalone_and_keeps_the_per_gpu_batch():
    from fairseq_ext.multiproc import torchrun_argv
    from launcher.stages import accumulation_steps

    assert torchrun_argv(2, "/t/spec.json", "/t/result.json", python="/opt/py") == [
        "/opt/py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "fairseq_ext.multiproc", "/t/spec.json", "/t/result.json"]
    # 125m: 16 sequences of 1024 tokens per GPU. An expert's batch on its 2 GPUs: no accumulation;
    # the seed's 16-GPU batch on one node's 8: two micro-batches per update.
    per_gpu = 16 * 1024
    assert accumulation_steps(2 * per_gpu, "125m", 2) == 1
    assert accumulation_steps(16 * per_gpu, "125m", 8) == 2
    assert accumulation_steps(16 * per_gpu, "125m", 1) == 16
    assert accumulation_steps(1024, "tiny", 1) == 1
    assert accumulation_steps(3 * 128, "tiny", 2) == 1  # 3 sequences on 2 ranks: the trainer says so


def test_the_multi_node_stage_starts_one_srun_step_of_env_ranks(monkeypatch):
    """The job step a --nodes M stage starts, the ranks' env:// variables from SLURM's, the
    collective timeout from the job's environment, and the dry run's launch line."""
    from fairseq_ext.multinode import master_port, slurm_rank_env, srun_argv
    from fairseq_ext.training.setup import collective_timeout
    from launcher.plan import launch_line

    assert srun_argv(2, 8, 10, "/s/spec.json", "/s/result.json", python="/opt/py") == [
        "srun", "--nodes=2", "--ntasks-per-node=8", "--cpus-per-task=10", "--kill-on-bad-exit=1", "--label",
        "/opt/py", "-u", "-m", "fairseq_ext.multinode", "/s/spec.json", "/s/result.json"]
    assert slurm_rank_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}) == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    assert master_port("123456") == master_port("123456") != master_port("123457")
    assert 1024 < master_port("123456") < 65536
    monkeypatch.setenv("BTM_COLLECTIVE_TIMEOUT_S", "60")
    assert collective_timeout().total_seconds() == 60
    for bad in ("0", "soon"):
        monkeypatch.setenv("BTM_COLLECTIVE_TIMEOUT_S", bad)
        with pytest.raises(BtmError, match="BTM_COLLECTIVE_TIMEOUT_S"):
            collective_timeout()
    job = build_plan(load_config("tiny", {"budget.gpus": 2}), load_profile("slurm-test"), "/r").job("seed")
    assert "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=1" in launch_line(job)
    one = build_plan(load_config("tiny"), load_profile("slurm-test"), "/r").job("seed")
    assert launch_line(one) is None


FAKE_SBATCH = """#!/bin/sh
# Stands in for sbatch: answers like sbatch with the next job id.
n=$(( $(cat "$FAKE_SLURM_COUNTER" 2>/dev/null || echo 1000) + 1 ))
echo "$n" > "$FAKE_SLURM_COUNTER"
echo "Submitted batch job $n"
"""


def fake_slurm(tmp_path, monkeypatch) -> None:
    """sbatch (answers with job ids 1001, 1002, ...) and srun (submitit looks for it) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_COUNTER", str(tmp_path / "counter"))


def _pickled_argv(path) -> list[str]:
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f).args[0]


@pytest.mark.parametrize("train_domains", [["bible", "code_python", "legal"], ["bible"]])
def test_the_executor_submits_exactly_the_rendered_script_and_task_argvs(tmp_path, monkeypatch, train_domains):
    """Through submitit's own code path (sbatch faked): the file submitit wrote for each job is
    ``submission(...).script`` and each task's pickled argv is its ``task_argvs`` entry. An array
    stage with one unit is submitted by submitit as a plain job; the ledger says so."""
    import json

    from launcher.executors.slurm import submit

    fake_slurm(tmp_path, monkeypatch)
    run_dir = tmp_path / "run"
    plan = build_plan(load_config("tiny", {"domains.train": train_domains}), load_profile("slurm-test"), str(run_dir))
    ctx = SbatchContext(run_dir=str(run_dir), run_name="tiny", array_parallelism=2, python="/opt/py")
    rows = submit(plan.jobs, plan.profile, ctx)
    folder = run_dir / "jobs" / "submitit"
    assert json.loads((run_dir / "jobs" / "submissions.json").read_text()) == rows
    for row, job in zip(rows, plan.jobs):
        sub = submission(job, plan.profile, ctx)  # ctx now holds every upstream id, as at submit time
        assert row["array"] == sub.array == (len(job.units) > 1)
        assert (folder / f"{row['job_id']}_submission.sh").read_text() == sub.script, job.name
        assert json.loads((run_dir / "jobs" / f"{job.name}.units.json").read_text()) == sub.units
        if sub.array:
            pickles = [folder / f"{row['job_id']}_{i}_submitted.pkl" for i in range(len(sub.units))]
        else:
            pickles = [folder / f"{row['job_id']}_submitted.pkl"]
        assert [_pickled_argv(p) for p in pickles] == sub.task_argvs, job.name
    train = submission(plan.job("train"), plan.profile, ctx)
    assert ("#SBATCH --array=0-2%2" in train.script) == (len(train_domains) == 3)
    assert f"#SBATCH --dependency=afterok:{ctx.dependency_ids['seed']}" in train.script


def test_an_array_past_max_array_size_is_several_arrays_treated_as_one_job(tmp_path, monkeypatch):
    """With MaxArraySize 2 (scontrol faked), three experts are two arrays: indices 0-1 and 0.
    Dependents wait for both ids; the ledger has one row per part; status joins every part."""
    import json

    from launcher.executors.slurm import submit
    from launcher.scheduler import parse_max_array_size
    from launcher.status import status_rows

    fake_slurm(tmp_path, monkeypatch)
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'MaxArraySize            = 2'\n")
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    run_dir = tmp_path / "run"
    plan = build_plan(load_config("tiny"), load_profile("slurm-test"), str(run_dir))
    ctx = SbatchContext(run_dir=str(run_dir), run_name="tiny", array_parallelism=2, python="/opt/py")
    rows = submit(plan.jobs, plan.profile, ctx)
    train = [r for r in rows if r["job"] == "train"]
    assert [(r["part"], r["units"], r["array"]) for r in train] == [
        (0, ["bible", "code_python"], True), (1, ["legal"], False)]
    ids = [r["job_id"] for r in train]
    assert ctx.dependency_ids["train"] == ":".join(ids)
    folder = run_dir / "jobs" / "submitit"
    first, second = ((folder / f"{i}_submission.sh").read_text() for i in ids)
    assert "#SBATCH --array=0-1%2" in first and "--array" not in second
    assert _pickled_argv(folder / f"{ids[1]}_submitted.pkl") == ["stage", str(run_dir), "train", "--unit", "legal"]
    merge = (folder / f"{ctx.dependency_ids['merge']}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterany:{ids[0]}:{ids[1]}" in merge
    assert json.loads((run_dir / "jobs" / "train.units.json").read_text()) == ["bible", "code_python", "legal"]
    status = {r[2]: r[5] for r in status_rows(run_dir, plan, rows, {}) if r[0] == "train"}
    assert status == {"bible": f"{ids[0]}_0", "code_python": f"{ids[0]}_1", "legal": ids[1]}
    # The limit as scontrol prints it; no line, no limit (nothing is split).
    assert parse_max_array_size("MaxArraySize            = 1001\nMaxBatchRequeue = 5\n") == 1001
    assert parse_max_array_size("MaxJobCount = 10000\n") is None
