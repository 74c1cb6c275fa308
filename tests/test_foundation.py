"""Foundation: the package's light half imports without fairseq/torch, and the CLI answers."""
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, require, run_btm

BLOCK_HEAVY = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('fairseq', 'torch', 'sentencepiece', 'fairseq_cli'):
                raise ImportError('blocked for this test: ' + name)
    sys.meta_path.insert(0, _Block())
""")


@pytest.mark.parametrize("module", [
    "launcher", "launcher.cli", "launcher.commands", "launcher.contract.presets", "launcher.contract.atomic",
    "launcher.stages.fewshot", "launcher.contract.results", "analysis", "analysis.report", "fairseq_ext",
])
def test_light_modules_import_without_fairseq_or_torch(module):
    code = BLOCK_HEAVY + f"import {module}\nimport launcher.cli; launcher.cli.build_parser()\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cli_help_lists_every_verb():
    proc = run_btm("--help", check=True)
    for verb in ["run", "status", "cancel", "data", "seed", "branch", "train", "eval",
                 "average", "cluster", "forest", "report", "export", "fewshot"]:
        assert verb in proc.stdout


def test_every_verb_has_help():
    from launcher.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for verb in sub.choices:
        proc = run_btm(verb, "--help")
        assert proc.returncode == 0, (verb, proc.stderr)
        assert "usage: btm" in proc.stdout


def test_setup_script_second_run_is_a_no_op():
    """scripts/setup_env.sh is idempotent: with .venv in place it only checks, then exits 0."""
    require((REPO / ".venv" / "bin" / "python").exists(), "no .venv in this checkout (run scripts/setup_env.sh)")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup_env.sh"), "--test"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "environment up to date" in proc.stderr


def test_setup_script_pins_fairseq_by_version_and_sha256():
    text = (REPO / "scripts" / "setup_env.sh").read_text()
    assert 'fairseq_spec="fairseq-fixed==0.12.3.1"' in text
    assert "--require-hashes" in text
    assert 'fairseq_sha256="c607577a54ab30e2ee0f0b0a754ea5cdbc6ad0a9f99a1726638a2201445bc1cc"' in text


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/run_tests.sh" in readme
    assert "bash scripts/run_tests.sh" in ci


def test_atomic_write_follows_umask_and_leaves_no_temp_file(tmp_path):
    import os
    from launcher.contract.atomic import atomic_write_text
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "out.txt", "hello")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").read_text() == "hello"
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    from launcher.contract.atomic import atomic_path
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]
