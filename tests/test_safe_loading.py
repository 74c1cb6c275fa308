"""Safe loading: checkpoints that need pickle are refused unless the user says --trust-checkpoint.

Two crafted files: ``evil.pt`` whose unpickling would run a shell command (it would create a
marker file), and ``legacy.pt``, a real tiny ELM checkpoint with an ``argparse.Namespace`` in
``args`` (what old fairseq checkpoints hold). Every verb that reads a user-given checkpoint
(branch, train --init, export hf, eval, average, the lm_eval model) refuses both, naming the
file and the flag, writes nothing, and never runs the payload; with --trust-checkpoint the
legacy file is converted into a weights_only checkpoint (branch) or used as it is (eval,
average, lm_eval: the same scores as the safe file's). Our own outputs load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from conftest import require_fairseq, run_btm
from eval_fixtures import tiny_data, tiny_experts  # noqa: F401

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
    from launcher.contract.atomic import sha256_file
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


# ---- eval, average and the lm_eval model: scoring a forest with a legacy expert ----------------

@pytest.fixture
def legacy_expert(tiny_experts, tmp_path):  # noqa: F811
    """The real legal expert of the evaluation tests, saved the old way (pickle needed), plus
    an evil file with the same weights."""
    import torch
    state = torch.load(tiny_experts["legal"], weights_only=True)
    legacy = tmp_path / "legal_legacy.pt"
    torch.save({**state, "args": argparse.Namespace(arch="elm_tiny")}, legacy)
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({**state, "extra": _Evil(marker)}, evil)
    return {"legacy": legacy, "evil": evil, "marker": marker}


def _eval_args(tiny_data, experts: dict):  # noqa: F811
    return ["--experts", ",".join(f"{n}={p}" for n, p in experts.items()), "--data", str(tiny_data),
            "--tokens-per-sample", "64", "--device", "cpu"]


def test_eval_and_average_refuse_pickle_checkpoints_without_the_flag(tiny_data, tiny_experts,  # noqa: F811
                                                                     legacy_expert, tmp_path, capsys):
    """One real CLI subprocess; the other cases through the same ``main`` in-process (faster)."""
    from launcher.cli import main

    def refused(*argv, name):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert name in err and "needs pickle" in err and "--trust-checkpoint" in err, err

    run = tmp_path / "run"
    for which in ("legacy", "evil"):
        common = _eval_args(tiny_data, {"bible": tiny_experts["bible"], "legal": legacy_expert[which]})
        eval_argv = ["eval", run, *common, "--domains", "legal", "--methods", "expert,ensemble_uniform"]
        if which == "legacy":
            _refused(run_btm(*eval_argv), "legal_legacy.pt")
        else:
            refused(*eval_argv, name="evil.pt")
        refused("average", run, *common, "--method", "uniform", "--eval-domains", "legal",
                name=legacy_expert[which].name)
    assert not run.exists() or sorted(p.name for p in run.iterdir()) == []  # nothing written
    # a single model given with --model is scored by the same loader (after the forest's rows)
    common = _eval_args(tiny_data, {"bible": tiny_experts["bible"]})
    refused("eval", tmp_path / "run2", *common, "--domains", "legal", "--methods", "expert",
            "--model", f"dense={legacy_expert['evil']}", name="evil.pt")
    assert not legacy_expert["marker"].exists()  # the payload never ran


def test_eval_and_average_use_a_trusted_legacy_checkpoint_like_the_safe_one(tiny_data, tiny_experts,  # noqa: F811
                                                                          legacy_expert, tmp_path):
    import torch
    from launcher.cli import main
    from launcher.contract.results import read_results
    trusted, safe = tmp_path / "trusted", tmp_path / "safe"
    for run, legal in ((trusted, legacy_expert["legacy"]), (safe, tiny_experts["legal"])):
        common = _eval_args(tiny_data, {"bible": tiny_experts["bible"], "legal": legal})
        flag = ["--trust-checkpoint"] if run is trusted else []
        assert main(["eval", str(run), *common, "--domains", "legal", "--methods", "expert,ensemble_uniform",
                     *flag]) == 0
        assert main(["average", str(run), *common, "--method", "uniform", "--eval-domains", "legal", *flag]) == 0
    got, ref = (read_results(d).set_index(["method", "eval_domain"]).sort_index() for d in (trusted, safe))
    assert list(got.index) == list(ref.index) and len(got) == 4  # 2 experts, the ensemble, the average
    assert got["nll"].to_numpy() == pytest.approx(ref["nll"].to_numpy(), rel=1e-12)  # same weights
    torch.load(trusted / "averages" / "uniform" / "checkpoint.pt", weights_only=True)  # the output is safe


def test_lm_eval_model_refuses_pickle_checkpoints_unless_trusted(tiny_data, legacy_expert):  # noqa: F811
    import importlib.util
    from conftest import require
    from launcher.contract.errors import BtmError
    require(importlib.util.find_spec("lm_eval") is not None, "lm-eval is not installed")
    from fairseq_ext.lm_eval_btm import BtmLM
    for which in ("legacy", "evil"):
        with pytest.raises(BtmError, match=rf"{which}.*needs pickle.*trust_checkpoint=true"):
            BtmLM(checkpoint=str(legacy_expert[which]), data_dir=str(tiny_data))
    assert not legacy_expert["marker"].exists()
    lm = BtmLM(checkpoint=str(legacy_expert["legacy"]), data_dir=str(tiny_data), trust_checkpoint="true")
    assert lm.mixture.names == ["legal_legacy"]
    with pytest.raises(BtmError, match="trust_checkpoint='maybe': expected true or false"):
        BtmLM(checkpoint=str(legacy_expert["legacy"]), data_dir=str(tiny_data), trust_checkpoint="maybe")
