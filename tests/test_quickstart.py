"""The README's cluster quick start, run as written on a freshly made corpus of the documented
layout (domains the paper configs never named): the plan takes every domain folder, --check
and the submission go through (sbatch faked: it answers like sbatch), nothing asks for
development-corpus domains."""
from __future__ import annotations

import os
import re
import shlex
import shutil

from conftest import REPO, run_btm
from test_sbatch import FAKE_SBATCH

DOMAINS = ["forum_posts", "news", "recipes"]


def _quick_start_commands() -> list[str]:
    """The shell lines of the README's 'Quick start on a SLURM cluster' block, continuations joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start on a SLURM cluster\n+```bash\n(.*?)```", text, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].split(" # ")[0].strip() for line in joined.splitlines() if line.strip()]


def _fresh_corpus(root):
    for d in DOMAINS:
        (root / d).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            (root / d / f"{split}.jsonl").write_text(f'{{"text": "a {d} {split} document"}}\n', encoding="utf-8")
    return root


def test_readme_cluster_quick_start_runs_as_written_on_a_new_corpus(tmp_path):
    corpus = _fresh_corpus(tmp_path / "data" / "my_corpus")
    run_dir = tmp_path / "scratch" / "btm-125m"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_COUNTER": str(tmp_path / "counter")}
    commands = _quick_start_commands()
    runs = [c for c in commands if c.startswith(".venv/bin/btm run ")]
    assert [c.split()[-1] for c in runs] == ["--dry-run", "--check", "mycluster.yaml"]  # the README's three steps
    assert "cp slurm_templates/profiles/gpu-cluster-example.yaml mycluster.yaml" in commands
    shutil.copy(REPO / "slurm_templates" / "profiles" / "gpu-cluster-example.yaml", tmp_path / "mycluster.yaml")
    outputs = []
    for command in runs:
        argv = shlex.split(command.replace("/scratch/$USER/btm-125m", str(run_dir))
                           .replace("/data/my_corpus", str(corpus)))[1:]
        outputs.append(run_btm(*argv, cwd=tmp_path, env=env, check=True).stdout)
    dry_run = outputs[0]
    assert "training domains (3): forum_posts, news, recipes" in dry_run
    assert "evaluation domains (3): forum_posts, news, recipes" in dry_run
    assert "3 experts x" in dry_run and "train units: forum_posts, news, recipes, random0" in dry_run
    # Submitted: the run directory keeps the resolved domains, so a rerun plans the same forest.
    saved = (run_dir / "config.yaml").read_text(encoding="utf-8")
    assert "- forum_posts" in saved and "code_python" not in saved
    assert (run_dir / "jobs" / "submissions.json").is_file()
