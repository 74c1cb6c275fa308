"""Completion records, the hash cache and the `stage` runner's resume logic."""
from __future__ import annotations

import dataclasses
import json

import pytest

from launcher.contract.errors import BtmError
from launcher.plan import Unit
from launcher.records import (HashCache, hash_files, is_done, read_record, record_path, spec_hash,
                              write_record)


def _write(tmp_path, params=None, inputs=(), outputs=()):
    cache = HashCache(tmp_path)
    return write_record(tmp_path, "train", "bible", params=params or {"a": 1}, config_hash="c" * 64,
                        inputs=hash_files(cache, inputs), outputs=hash_files(cache, outputs),
                        started="2026-01-01T00:00:00+00:00")


def test_record_fields_and_atomic_location(tmp_path):
    (tmp_path / "in.bin").write_bytes(b"in")
    (tmp_path / "out.pt").write_bytes(b"out")
    rec = _write(tmp_path, inputs=[tmp_path / "in.bin"], outputs=[tmp_path / "out.pt"])
    path = record_path(tmp_path, "train", "bible")
    assert path == tmp_path / "records" / "train.bible.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == rec
    for key in ("stage", "unit", "config_hash", "spec_hash", "inputs", "outputs", "versions", "git_commit",
                "started", "finished", "sacct"):
        assert key in on_disk
    assert on_disk["inputs"] == {"in.bin": __import__("hashlib").sha256(b"in").hexdigest()}
    assert on_disk["versions"]["python"]
    assert record_path(tmp_path, "data", None).name == "data.json"


def test_done_only_while_spec_inputs_and_outputs_match(tmp_path):
    (tmp_path / "in.bin").write_bytes(b"in")
    (tmp_path / "out.pt").write_bytes(b"out")
    _write(tmp_path, inputs=[tmp_path / "in.bin"], outputs=[tmp_path / "out.pt"])
    unit = Unit("bible", {"a": 1})
    assert is_done(tmp_path, "train", unit)
    assert not is_done(tmp_path, "train", Unit("bible", {"a": 2}))  # other parameters
    (tmp_path / "in.bin").write_bytes(b"changed input")
    assert not is_done(tmp_path, "train", unit)
    (tmp_path / "in.bin").write_bytes(b"in")
    assert is_done(tmp_path, "train", unit)
    (tmp_path / "out.pt").unlink()
    assert not is_done(tmp_path, "train", unit)


def test_missing_record_is_not_done_and_an_unreadable_one_is_an_error(tmp_path):
    assert read_record(tmp_path, "train", "bible") is None
    assert not is_done(tmp_path, "train", Unit("bible", {}))
    path = record_path(tmp_path, "train", "bible")
    path.parent.mkdir(parents=True)
    for text in ("{truncated", "[1, 2]", '{"stage": "seed"}'):
        path.write_text(text)
        with pytest.raises(BtmError, match=rf"{path}.*delete it to run train bible again"):
            is_done(tmp_path, "train", Unit("bible", {}))


def test_corrupt_hash_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
    f = tmp_path / "in.bin"
    f.write_bytes(b"in")
    cache_file = tmp_path / "records" / ".hashes.json"
    cache_file.parent.mkdir()
    for text in ("{truncated", '{"in.bin": "not a triple"}'):
        cache_file.write_text(text)
        cache = HashCache(tmp_path)
        assert f"hash cache {cache_file}" in capsys.readouterr().err
        assert cache.sha256(f) == __import__("hashlib").sha256(b"in").hexdigest()
        cache.save()
        assert list(json.loads(cache_file.read_text())) == ["in.bin"]
        HashCache(tmp_path)
        assert capsys.readouterr().err == ""  # rebuilt: read without a warning


def test_hash_cache_reuses_and_invalidates(tmp_path, monkeypatch):
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 1000)
    cache = HashCache(tmp_path)
    first = cache.sha256(f)
    cache.save()
    calls = []
    import launcher.records as records

    monkeypatch.setattr(records, "sha256_file", lambda p: calls.append(p) or "recomputed")
    again = HashCache(tmp_path)
    assert again.sha256(f) == first and calls == []
    f.write_bytes(b"y" * 1001)
    assert again.sha256(f) == "recomputed"
    assert again.sha256(tmp_path / "missing") is None


def test_spec_hash_is_order_independent():
    assert spec_hash({"a": 1, "b": [1, 2]}) == spec_hash({"b": [1, 2], "a": 1}) != spec_hash({"a": 2, "b": [1, 2]})


def test_stage_runner_records_and_skips(tmp_path, monkeypatch):
    """run_stage with a trivial stage body (the model-side stages have their own tests)."""
    from launcher import stages
    from launcher.config import load_config

    corpus = tmp_path / "corpus"
    for d in ("bible", "code_python", "legal"):
        (corpus / d).mkdir(parents=True)
        (corpus / d / "train.jsonl").write_text('{"text": "x"}\n')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(load_config("tiny", corpus=corpus).to_yaml())
    calls = []

    def fake_run(ctx):
        calls.append(ctx.unit.name)
        out = ctx.run_dir / "data" / "manifest.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text("{}")
        return [out], {"note": "fake"}

    data, registry = stages.get_stage("data_plan"), list(stages.STAGES)

    def with_data_run(run):
        return [dataclasses.replace(data, run=run) if s is data else s for s in registry]

    monkeypatch.setattr(stages, "STAGES", with_data_run(fake_run))
    assert stages.run_stage(run_dir, "data_plan", None) == 0
    assert stages.run_stage(run_dir, "data_plan", None) == 0  # record current: skipped
    assert calls == [None]
    rec = read_record(run_dir, "data_plan", None)
    assert rec["note"] == "fake" and "data/manifest.json" in rec["outputs"]
    assert any(k.endswith("bible/train.jsonl") for k in rec["inputs"])
    (corpus / "bible" / "train.jsonl").write_text('{"text": "new"}\n')
    assert stages.run_stage(run_dir, "data_plan", None) == 0
    assert calls == [None, None]  # an input changed: ran again

    def preempted(ctx):
        raise stages.Preempted()

    monkeypatch.setattr(stages, "STAGES", with_data_run(preempted))
    assert stages.run_stage(run_dir, "data_plan", None, force=True) == 3


def test_stage_rejects_unknown_stage_and_unit(tmp_path):
    from launcher.config import load_config
    from launcher.contract.errors import BtmError
    from launcher.stages import run_stage

    (tmp_path / "config.yaml").write_text(load_config("tiny").to_yaml())
    with pytest.raises(BtmError, match="unknown stage"):
        run_stage(tmp_path, "trian", None)
    with pytest.raises(BtmError, match="no unit 'nope'"):
        run_stage(tmp_path, "train", "nope")
    with pytest.raises(BtmError, match="not a btm run directory"):
        run_stage(tmp_path / "nothing", "train", "bible")
