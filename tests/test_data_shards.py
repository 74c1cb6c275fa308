"""Sharded data preparation (fairseq_ext/shards.py, binarize.py, data_prep's plan/task/merge):
shards cut at document boundaries, the same bytes whatever the shard count, balanced tasks,
long documents encoded in pieces with the same ids."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import require_fairseq, write_small_corpus
from launcher.contract.corpus import iter_documents, read_documents, shard_ranges

pytestmark = pytest.mark.fairseq

VOCAB = 500


@pytest.fixture(scope="module")
def dp():
    require_fairseq()
    from fairseq_ext import data_prep

    return data_prep


def test_shards_of_a_file_hold_its_documents_in_order(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"document {i} " * (i % 7 + 1)}) + "\n\n" for i in range(200)))
    txt = tmp_path / "train.txt"
    txt.write_text("".join(f"line one of {i}\nline two of {i}\n\n\n" for i in range(200)))
    for path in (jsonl, txt):
        ranges = shard_ranges(path, 500)
        assert len(ranges) > 5 and ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        pieces = [d for r in ranges for d in iter_documents(path, "text", r)]
        assert pieces == read_documents(path)


def test_one_shard_and_seven_shards_give_the_same_bytes(dp, small_corpus, tmp_path):
    size = (small_corpus / "legal" / "train.jsonl").stat().st_size
    one = dp.prepare_data(small_corpus, tmp_path / "one", vocab_size=VOCAB, workers=1, progress=False)
    seven = dp.prepare_data(small_corpus, tmp_path / "seven", vocab_size=VOCAB, workers=2, progress=False,
                            shard_bytes=size // 7 + 1)
    assert one["datasets"]["legal/train"]["shards"] == 1
    assert seven["datasets"]["legal/train"]["shards"] == 7
    assert seven["data_hash"] == one["data_hash"]
    for name in ("legal/train.bin", "legal/train.idx", "bible/test.idx"):
        assert (tmp_path / "seven" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_one_huge_domain_and_tiny_ones_make_balanced_tasks(dp, tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus", ["bible", "code_python", "legal"],
                                {"train": 20, "valid": 4, "test": 4})
    huge = corpus / "huge"
    huge.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(corpus / "bible" / f"{split}.jsonl", huge / f"{split}.jsonl")
    with (huge / "train.jsonl").open("a") as f:  # the huge domain: ~30 times the others' text
        for _ in range(30):
            f.write((corpus / "legal" / "train.jsonl").read_text())
    out = tmp_path / "data"
    shard_bytes = 20_000
    summary = dp.plan_data(corpus, out, vocab_size=VOCAB, train_domains=["bible", "code_python", "legal"],
                           shard_bytes=shard_bytes)
    tasks = 4
    results = [dp.binarize_task(out, t, tasks) for t in range(tasks)]
    assert sum(r["shards"] for r in results) == summary["shards"]
    loads = [r["bytes"] for r in results]
    # every task within one shard (plus the line at its cut) of the mean
    assert max(loads) - min(loads) <= 2 * shard_bytes, loads
    assert min(loads) > 0.5 * sum(loads) / tasks, loads
    manifest = dp.merge_data(out)
    single = dp.prepare_data(corpus, tmp_path / "single", vocab_size=VOCAB,
                             train_domains=["bible", "code_python", "legal"], workers=1, progress=False)
    assert manifest["data_hash"] == single["data_hash"]
    assert manifest["datasets"]["huge/train"]["shards"] > tasks


def test_merge_refuses_missing_shards(dp, small_corpus, tmp_path):
    from launcher.contract.errors import BtmError

    out = tmp_path / "data"
    dp.plan_data(small_corpus, out, vocab_size=VOCAB, shard_bytes=4000)
    dp.binarize_task(out, 0, 2)
    with pytest.raises(BtmError, match="not binarized.*run their shard tasks"):
        dp.merge_data(out)
    dp.binarize_task(out, 1, 2)
    assert dp.merge_data(out)["domains"] == ["bible", "code_python", "legal"]
    assert dp.binarize_task(out, 0, 2)["shards"] == 0, "after the merge a task has nothing left to do"
    assert dp.merge_data(out)["domains"] == ["bible", "code_python", "legal"]  # and a merge neither


def test_long_document_is_encoded_in_pieces_with_the_same_ids(dp, small_corpus, tmp_path):
    from fairseq_ext.spm_tokenizer import encode_with, text_chunks

    out = tmp_path / "data"
    dp.plan_data(small_corpus, out, vocab_size=VOCAB)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    text = "  ".join(read_documents(small_corpus / "legal" / "train.jsonl")) + " tail\u2581 end  "
    chunks = list(text_chunks(text, 300))
    assert len(chunks) > 10 and "".join(chunks) == text
    assert [i for c in chunks for i in encode_with(sp, c)] == encode_with(sp, text)
    assert list(text_chunks("x" * 1000, 300)) == ["x" * 1000]  # no place to cut: whole


def test_cbtm_stages_fit_assign_array_merge_same_clusters_as_one_task(dp, small_corpus, tmp_path):
    """data_plan -> data_shard x2 -> data -> cluster_fit -> cluster_assign x3 -> cluster, run as
    the array tasks would run them; the clusters equal those of a one-task assignment."""
    from launcher.config import load_config
    from launcher.stages import run_stage

    def staged(name, tasks):
        cfg = load_config("cbtm-tiny", {"corpus": {"path": str(small_corpus), "vocab_size": 400, "shard_mb": 0.01,
                                                   "shard_tasks": 2},
                                        "clusters": {"k": 2, "assign_tasks": tasks}}, corpus=small_corpus)
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        steps = [("data_plan", None), ("data_shard", "t0"), ("data_shard", "t1"), ("data", None),
                 ("cluster_fit", None), *[("cluster_assign", f"s{t}") for t in range(tasks)], ("cluster", None)]
        for stage, unit in steps:
            assert run_stage(run_dir, stage, unit) == 0, (stage, unit)
        return run_dir

    three, one = staged("three", 3), staged("one", 1)
    for c in ("cluster_0", "cluster_1"):
        for split in ("train", "valid", "test"):
            got = (three / "clusters" / "domains" / c / f"{split}.jsonl").read_bytes()
            assert got == (one / "clusters" / "domains" / c / f"{split}.jsonl").read_bytes()
    manifest = json.loads((three / "data" / "manifest.json").read_text())
    assert {"cluster_0", "cluster_1"} <= set(manifest["domains"])
    assert not (three / "clusters" / "domains" / ".shards").exists(), "merged slices are removed"
    counted = json.loads((three / "clusters" / "domains" / ".document_counts.json").read_text())
    assert len(counted["counts"]) == 9  # counted once by cluster_fit: 3 domains x 3 splits
    assert run_stage(three, "cluster_assign", "s1") == 0  # a re-run: record current, nothing redone
