"""c-BTM fit + assign end to end: CLI, sharding, idempotency, edge cases (purity on the
development corpus: tests/test_cluster_purity.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_btm
from fairseq_ext.cluster import (AssignSettings, FitSettings, assign_corpus, assign_shard,
                                 build_cluster_domains, merge_shards)
from fairseq_ext.cluster.pipeline import fit_model_dir
from launcher.contract.errors import BtmError

def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _write(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def test_cli_fit_assign_shards_merge_and_rerun(small_corpus, tmp_path):
    # CLI calls are few on purpose (each pays the scikit-learn import); the rest is in-process.
    model = tmp_path / "model"
    proc = run_btm("cluster", "fit", "--corpus", small_corpus, "--k", "3", "--out", model,
                   "--dims", "20", check=True)
    assert "fitted" in proc.stdout and "sizes=[60, 60, 60]" in proc.stdout
    again = run_btm("cluster", "fit", "--corpus", small_corpus, "--k", "3", "--out", model,
                    "--dims", "20", check=True)
    assert "already fitted" in again.stdout

    whole = tmp_path / "whole"
    run_btm("cluster", "assign", "--model", model, "--corpus", small_corpus, "--out", whole, check=True)
    report = json.loads((whole / "cluster_report.json").read_text())
    assert report["k"] == 3 and report["documents"] == 3 * (60 + 8 + 8)
    assert sorted(s["train"] for s in report["sizes"].values()) == [60, 60, 60]  # fitted: balanced
    assert report["documents_from_fitting_sample"] == 180
    assert report["purity"]["train"] >= 0.9 and report["labels"] == ["bible", "code_python", "legal"]
    for c in range(3):
        for split in ("train", "valid", "test"):
            rows = [json.loads(x) for x in _lines(whole / f"cluster_{c}" / f"{split}.jsonl")]
            assert len(rows) == report["sizes"][f"cluster_{c}"][split]
            assert all(set(r) == {"text"} and r["text"].strip() for r in rows)

    # Three SLURM-style shards (out of order) then a merge give byte-identical domains.
    sharded = tmp_path / "sharded"
    with pytest.raises(BtmError, match=r"shard\(s\) \[0, 1, 2\] of 3 are not finished"):
        merge_shards(model, small_corpus, sharded, 3)
    assign_shard(model, small_corpus, sharded, 2, 3)
    run_btm("cluster", "assign", "--model", model, "--corpus", small_corpus, "--out", sharded,
            "--shard", "0", "--num-shards", "3", check=True)
    with pytest.raises(BtmError, match=r"shard\(s\) \[1\] of 3"):
        merge_shards(model, small_corpus, sharded, 3)
    assign_shard(model, small_corpus, sharded, 1, 3)
    merged = run_btm("cluster", "assign", "--model", model, "--corpus", small_corpus, "--out",
                     sharded, "--merge", "--num-shards", "3", check=True)
    assert "228 documents in 3 clusters" in merged.stdout
    assert not (sharded / ".shards").exists()
    for c in range(3):
        for split in ("train", "valid", "test"):
            name = f"cluster_{c}/{split}.jsonl"
            assert (sharded / name).read_bytes() == (whole / name).read_bytes(), name
    rep_sharded = json.loads((sharded / "cluster_report.json").read_text())
    assert rep_sharded["sizes"] == report["sizes"] and rep_sharded["purity"] == report["purity"]

    # Re-running is idempotent: nothing changes, and a shard after the merge is a no-op.
    before = _snapshot(whole)
    assign_corpus(model, small_corpus, whole)
    assert _snapshot(whole) == before
    assert "skipped" in assign_shard(model, small_corpus, sharded, 1, 3)
    assert not (sharded / ".shards").exists()


def test_cli_errors_are_clear(small_corpus, tmp_path):
    proc = run_btm("cluster", "fit", "--corpus", small_corpus, "--k", "500", "--out", tmp_path / "m")
    assert proc.returncode == 2
    assert "btm: error: cannot make k=500 clusters from 180 document(s)" in proc.stderr
    proc = run_btm("cluster", "assign", "--model", tmp_path / "m", "--corpus", small_corpus,
                   "--out", tmp_path / "o")
    assert proc.returncode == 2 and "not a fitted cluster model" in proc.stderr
    with pytest.raises(BtmError, match="does not exist"):
        fit_model_dir(tmp_path / "nope", tmp_path / "m", FitSettings(k=2))
    bad = tmp_path / "bad" / "d"
    bad.mkdir(parents=True)
    (bad / "train.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(BtmError, match=r"train.jsonl:2: .*'text'"):
        fit_model_dir(tmp_path / "bad", tmp_path / "m", FitSettings(k=1))
    with pytest.raises(BtmError, match="--shard 3 --num-shards 3"):
        assign_shard(tmp_path / "m", small_corpus, tmp_path / "o", 3, 3)


def test_empty_documents_duplicates_and_single_unlabelled_domain(tmp_path):
    corpus = tmp_path / "flat"  # no domain subdirectories: one unlabelled domain
    texts = (["lord god israel unto thee"] * 5 + ["def return import self class"] * 5
             + ["", "   ", "license copyright warranty"])
    _write(corpus / "train.jsonl", texts)
    (corpus / "valid.txt").write_text("lord god\nunto thee\n\n\n\ndef return self\n", encoding="utf-8")
    result = build_cluster_domains(corpus, tmp_path / "out", 2, seed=0, dims=4)
    report = result["report"]
    # As data prep reads it: "" is no document, "   " is one (it is written to a cluster too).
    assert report["documents"] == 12 + 2
    assert report["purity"] is None and report["labels"] is None
    assert sorted(s["train"] for s in report["sizes"].values()) == [6, 6]  # balanced, dups split OK
    domains = Path(result["corpus_dir"])
    trains = {c: _lines(domains / c / "train.jsonl") for c in result["domains"]}
    god = [c for c, rows in trains.items() if json.dumps({"text": "lord god israel unto thee"}) in rows]
    assert len(god) == 1  # five exact duplicates land together (5 <= ceil(12/2))
    assert sum(rows.count(json.dumps({"text": "   "})) for rows in trains.values()) == 1
    valid = sum(len(_lines(domains / c / "valid.jsonl")) for c in result["domains"])
    assert valid == 2  # txt documents: separated by blank lines


def test_k_equals_one_is_the_whole_corpus(small_corpus, tmp_path):
    result = build_cluster_domains(small_corpus, tmp_path, 1, seed=0, dims=10)
    assert result["domains"] == ["cluster_0"]
    domain = Path(result["corpus_dir"]) / "cluster_0"
    for split, n in (("train", 60), ("valid", 8), ("test", 8)):
        expected = sorted(json.loads(x)["text"] for d in ("bible", "code_python", "legal")
                          for x in _lines(small_corpus / d / f"{split}.jsonl"))
        got = sorted(json.loads(x)["text"] for x in _lines(domain / f"{split}.jsonl"))
        assert got == expected and len(got) == 3 * n
    assert result["report"]["purity"]["train"] == pytest.approx(1 / 3)  # three equal domains


def test_k_larger_than_documents_via_pipeline(tmp_path):
    _write(tmp_path / "c" / "a" / "train.jsonl", ["lord god", "def return"])
    with pytest.raises(BtmError, match="k=3 clusters from 2 document"):
        build_cluster_domains(tmp_path / "c", tmp_path / "o", 3)


def test_stale_clusters_from_another_k_are_refused(small_corpus, tmp_path):
    build_cluster_domains(small_corpus, tmp_path / "o", 3, dims=10)
    fit_model_dir(small_corpus, tmp_path / "m2", FitSettings(k=2, dims=10))
    with pytest.raises(BtmError, match="cluster_2"):
        assign_corpus(tmp_path / "m2", small_corpus, tmp_path / "o" / "domains", AssignSettings())


def test_every_cluster_gets_valid_and_test_documents(tmp_path):
    """Nearest-centre assignment would leave cluster 'law' without valid documents here (all
    valid documents are bible-like); one is moved so `btm data prepare` accepts the cluster.
    The donor's file is rewritten: a line break json.dumps leaves unescaped (U+2028, U+0085)
    inside a document must not split its line."""
    bible = ["lord god israel unto thee thou shalt", "king jerusalem\u2028lord said\x85unto"]
    law = ["license copyright warranty liability", "permission distribute software license"]
    _write(tmp_path / "c" / "bible" / "train.jsonl", bible * 3)
    _write(tmp_path / "c" / "law" / "train.jsonl", law * 3)
    _write(tmp_path / "c" / "bible" / "valid.jsonl", bible + ["lord god unto israel"])
    _write(tmp_path / "c" / "law" / "valid.jsonl", ["lord unto thee king"])
    result = build_cluster_domains(tmp_path / "c", tmp_path / "o", 2, dims=4)
    report = result["report"]
    assert all(s["valid"] >= 1 for s in report["sizes"].values()), report["sizes"]
    assert len(report["moved_to_fill_empty_splits"]) == 1
    move = report["moved_to_fill_empty_splits"][0]
    assert move["split"] == "valid"
    domains = Path(result["corpus_dir"])
    valid = [json.loads(line)["text"] for c in result["domains"]
             for line in (domains / c / "valid.jsonl").read_text(encoding="utf-8").split("\n")[:-1]]
    assert sorted(valid) == sorted(bible + ["lord god unto israel", "lord unto thee king"])
    with np.load(domains / "assignments.npz", allow_pickle=False) as z:
        assert np.bincount(z["cluster"], minlength=2).sum() == 12 + 4


def test_fit_refits_when_the_corpus_changes(tmp_path):
    corpus = tmp_path / "c"
    _write(corpus / "a" / "train.jsonl", ["lord god israel", "def return self", "license copyright"])
    settings = FitSettings(k=2, dims=2)
    assert fit_model_dir(corpus, tmp_path / "m", settings) is True
    assert fit_model_dir(corpus, tmp_path / "m", settings) is False  # same corpus: skipped
    _write(corpus / "a" / "train.jsonl", ["lord god israel", "def return self", "license copyright", "unto thee"])
    assert fit_model_dir(corpus, tmp_path / "m", settings) is True
    assert fit_model_dir(corpus, tmp_path / "m", FitSettings(k=3, dims=2)) is True  # new settings
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["settings"]["document_numbering"] = 1  # fitted when c-BTM numbered empty texts too
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    assert fit_model_dir(corpus, tmp_path / "m", FitSettings(k=3, dims=2)) is True
