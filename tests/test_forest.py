"""The forest manifest: add, remove, verify (API and `btm forest`)."""
from __future__ import annotations

import json

import pytest

from conftest import run_btm
from launcher.contract.errors import BtmError
from launcher.contract.forest import Forest, editing


def _ckpt(path, data=b"weights"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_add_list_remove_roundtrip(tmp_path):
    a = _ckpt(tmp_path / "experts" / "a" / "checkpoint_last.pt", b"A")
    b = _ckpt(tmp_path / "experts" / "b" / "checkpoint_last.pt", b"B")
    with editing(tmp_path, "r") as forest:
        forest.add("a", ["legal"], a, parents={"seed": 1.0}, updates=10, tokens=1000)
        forest.add("b", ["bible"], b, parents={"a": 0.7, "seed": 0.3}, metrics={"valid_loss": 3.2})
    f = Forest.load(tmp_path)
    assert f.names() == ["a", "b"]
    e = f.get("b")
    assert e.id == 1 and e.parents == {"a": 0.7, "seed": 0.3} and e.checkpoint == "experts/b/checkpoint_last.pt"
    assert e.metrics == {"valid_loss": 3.2}
    data = json.loads((tmp_path / "forest.json").read_text())
    assert data["format"] == 1 and data["experts"][0]["sha256"] == f.get("a").sha256
    with editing(tmp_path) as forest:
        forest.remove("a")
    assert Forest.load(tmp_path).names() == ["b"]
    assert a.exists()  # removing an expert never deletes its checkpoint


def test_add_refuses_duplicates_missing_files_and_bad_names(tmp_path):
    a = _ckpt(tmp_path / "a.pt")
    forest = Forest(run="r", path=tmp_path / "forest.json")
    forest.add("a", ["legal"], a)
    with pytest.raises(BtmError, match="already"):
        forest.add("a", ["legal"], a)
    with pytest.raises(BtmError, match="does not exist"):
        forest.add("b", ["legal"], tmp_path / "nope.pt")
    with pytest.raises(BtmError, match="invalid"):
        forest.add("../evil", ["legal"], a)
    with pytest.raises(BtmError, match="no expert 'zzz'"):
        forest.remove("zzz")


def test_verify_names_changed_and_missing_checkpoints(tmp_path):
    paths = {n: _ckpt(tmp_path / f"{n}.pt", n.encode()) for n in ("a", "b", "c")}
    with editing(tmp_path, "r") as forest:
        for n, p in paths.items():
            forest.add(n, [n], p)
    assert Forest.load(tmp_path).verify() == []
    paths["b"].write_bytes(b"tampered")
    paths["c"].unlink()
    assert Forest.load(tmp_path).verify() == ["b", "c"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(BtmError, match="no forest manifest"):
        Forest.load(tmp_path)
    (tmp_path / "forest.json").write_text("{not json")
    with pytest.raises(BtmError, match="forest.json"):
        Forest.load(tmp_path)
    (tmp_path / "forest.json").write_text(json.dumps({"format": 1, "experts": [{"name": "x", "bogus": 1}]}))
    with pytest.raises(BtmError, match="bogus"):
        Forest.load(tmp_path)


def test_cli_forest_add_list_verify_remove(tmp_path):
    ck = _ckpt(tmp_path / "experts" / "x" / "checkpoint_last.pt", b"X")
    r = run_btm("forest", "add", tmp_path, "x", ck, "--domains", "legal,bible", "--parent", "seed=1", "--updates", "5",
                check=True)
    assert "added expert x" in r.stdout
    r = run_btm("forest", "list", tmp_path, check=True)
    assert "x" in r.stdout and "legal,bible" in r.stdout and "seed:1" in r.stdout
    assert run_btm("forest", "verify", tmp_path).returncode == 0
    ck.write_bytes(b"Y")
    r = run_btm("forest", "verify", tmp_path)
    assert r.returncode == 1 and "x" in r.stderr
    r = run_btm("forest", "add", tmp_path, "y", tmp_path / "missing.pt", "--domains", "a")
    assert r.returncode == 2 and "btm: error:" in r.stderr and "missing.pt" in r.stderr
    run_btm("forest", "remove", tmp_path, "x", check=True)
    assert "x" not in run_btm("forest", "list", tmp_path, check=True).stdout.split()
