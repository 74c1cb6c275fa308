"""Safe loading: checkpoints that need pickle are refused unless the user says --trust-checkpoint.

Two crafted files: ``evil.pt`` whose unpickling would run a shell command (it would create a
marker file), and ``legacy.pt``, a real tiny ELM checkpoint with an ``argparse.Namespace`` in
``args`` (what old fairseq checkpoints hold). Every verb that reads a user-given checkpoint
(branch, train --init, export hf) refuses both, naming the file and the flag, writes nothing,
and never runs the payload; with --trust-checkpoint the legacy file is converted into a
weights_only checkpoint. Our own outputs load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from conftest import require_fairseq, run_btm

pytestmark = [pytest.mark.fairseq, pytest.mark.slow]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny(path: Path) -> Path:
    from test_bad_inputs import _tiny_checkpoint
    return _tiny_checkpoint(path)


@pytest.fixture
def crafted(tmp_path):
    require_fairseq()
    import torch
    good = _tiny(tmp_path / "good.pt")
    state = torch.load(good, weights_only=True)
    legacy = tmp_path / "legacy.pt"
    torch.save({**state, "args": argparse.Namespace(arch="elm_tiny")}, legacy)  # no sidecar, like a download
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({**state, "extra": _Evil(marker)}, evil)
    return {"good": good, "legacy": legacy, "evil": evil, "marker": marker, "dir": tmp_path}


def _refused(r, name: str):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert name in r.stderr and "needs pickle" in r.stderr and "--trust-checkpoint" in r.stderr, r.stderr


@pytest.mark.parametrize("which", ["evil", "legacy"])
def test_branch_refuses_pickle_checkpoints(crafted, which):
    out = crafted["dir"] / "experts" / "x" / "init.pt"
    _refused(run_btm("branch", "--out", out, "--from", crafted[which]), f"{which}.pt")
    assert not out.exists() and not (out.parent / "branch.json").exists()
    assert not crafted["marker"].exists()  # the payload never ran


def test_train_init_refuses_pickle_checkpoints(crafted):
    d = crafted["dir"]
    (d / "dict.txt").write_text("".join(f"tok{i} 1\n" for i in range(60)))
    (d / "alpha").mkdir()
    r = run_btm("train", "--data", d, "--domain", "alpha", "--init", crafted["evil"], "--save-dir", d / "s",
                "--updates", "1")
    _refused(r, "evil.pt")
    assert not (d / "s" / "checkpoint_last.pt").exists() and not crafted["marker"].exists()


def test_export_refuses_pickle_checkpoints(crafted):
    out = crafted["dir"] / "hf"
    _refused(run_btm("export", "hf", crafted["evil"], out), "evil.pt")
    assert not crafted["marker"].exists()
    assert not (out / "model.safetensors").exists()


def test_trust_flag_converts_a_legacy_checkpoint_to_weights_only(crafted):
    import torch
    out = crafted["dir"] / "converted" / "init.pt"
    run_btm("branch", "--out", out, "--from", crafted["legacy"], "--trust-checkpoint", check=True)
    state = torch.load(out, weights_only=True)  # safe from here on
    ref = torch.load(crafted["good"], weights_only=True)
    assert all(torch.equal(state["model"][k], ref["model"][k]) for k in ref["model"])
    # and every verb now takes it without the flag
    r = run_btm("branch", "--out", crafted["dir"] / "again" / "init.pt", "--from", out)
    assert r.returncode == 0, r.stderr


def test_our_outputs_load_weights_only(crafted, tmp_path):
    """branch and average outputs (+ the sidecars' hashes), and export's safetensors."""
    import torch
    from launcher.atomic import sha256_file
    from safetensors.torch import load_file
    out = tmp_path / "b" / "init.pt"
    run_btm("branch", "--out", out, "--parents", f"{crafted['good']}=1,{crafted['good']}=1", check=True)
    torch.load(out, weights_only=True)
    assert Path(str(out) + ".sha256").read_text().split()[0] == sha256_file(out)
    hf = tmp_path / "hf"
    r = run_btm("export", "hf", out, hf)
    if r.returncode == 0:
        tensors = sorted(hf.rglob("*.safetensors"))
        assert tensors and load_file(str(tensors[0]))
        assert not list(hf.rglob("*.bin")) and not list(hf.rglob("*.pkl"))
    else:  # export needs the tokenizer of a real data dir; the hand-made dictionary has none
        assert "Traceback" not in r.stderr and "btm: error:" in r.stderr
