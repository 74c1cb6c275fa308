"""`btm data prepare` (fairseq_ext/data_prep.py, spm_tokenizer.py, binarize.py) with real
sentencepiece and fairseq."""
from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, require_fairseq, run_btm
from launcher.contract.atomic import sha256_file
from launcher.contract.data_manifest import read_data_manifest
from launcher.contract.errors import BtmError

pytestmark = pytest.mark.fairseq

VOCAB = 500  # small: the 3-domain fixture has ~200 KB of training text


@pytest.fixture(scope="module")
def dp():
    require_fairseq()
    from fairseq_ext import data_prep

    return data_prep


@pytest.fixture(scope="module")
def prepared(dp, small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "data"
    manifest = dp.prepare_data(small_corpus, out, vocab_size=VOCAB, workers=2, progress=False)
    return out, manifest


def corpus_docs(corpus: Path, domain: str, split: str) -> list[str]:
    from launcher.contract.corpus import find_split_file, read_documents

    return read_documents(find_split_file(corpus, domain, split))


def output_files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".prepare.lock"}


# ---------------------------------------------------------------------------- the happy path


def test_datasets_hold_one_item_per_document_and_decode_back(prepared, small_corpus, dp):
    from fairseq.data import data_utils

    out, manifest = prepared
    dictionary = dp.load_dictionary(out)
    assert (dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk()) == (0, 1, 2, 3)
    assert len(dictionary) == manifest["vocab_size"] == VOCAB
    assert manifest["domains"] == ["bible", "code_python", "legal"]
    for domain in manifest["domains"]:
        for split in ("train", "valid", "test"):
            docs = corpus_docs(small_corpus, domain, split)
            ds = data_utils.load_indexed_dataset(str(out / domain / split), dictionary, "mmap")
            assert ds is not None and len(ds) == len(docs) == manifest["datasets"][f"{domain}/{split}"]["documents"]
            assert sum(len(ds[i]) for i in range(len(ds))) == manifest["datasets"][f"{domain}/{split}"]["tokens"]
            for i, doc in enumerate(docs):
                item = ds[i]
                assert int(item[-1]) == dictionary.eos() and dictionary.eos() not in item[:-1].tolist()
                assert dp.decode_ids(out, item.tolist()) == doc
            # fairseq's own symbol strings + sentencepiece's piece decoder agree
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
            pieces = dictionary.string(ds[0][:-1]).split(" ")
            assert sp.decode_pieces(pieces) == docs[0]


def test_tokens_csv_and_manifest_hashes_match_files(prepared):
    out, manifest = prepared
    rows = list(csv.DictReader((out / "tokens.csv").open()))
    assert {(r["domain"], r["split"]) for r in rows} == {tuple(k.split("/")) for k in manifest["data_hash"]}
    for r in rows:
        info = manifest["datasets"][f"{r['domain']}/{r['split']}"]
        assert (int(r["documents"]), int(r["tokens"])) == (info["documents"], info["tokens"])
        prefix = out / r["domain"] / r["split"]
        assert sha256_file(f"{prefix}.bin") == info["bin_sha256"]
        assert sha256_file(f"{prefix}.idx") == info["idx_sha256"]
        assert info["data_hash"] == manifest["data_hash"][f"{r['domain']}/{r['split']}"]
    assert sha256_file(out / "spm.model") == manifest["spm_model_sha256"]
    assert sha256_file(out / "dict.txt") == manifest["dict_sha256"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["vocab_size"] == VOCAB and manifest["splits"] == ["train", "valid", "test"]
    # equal characters from every training domain
    assert len(set(manifest["tokenizer_sample_chars"].values())) == 1


def test_fairseq_language_modeling_task_reads_a_domain(prepared, dp):
    from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

    out, _ = prepared
    # stock fairseq: the domain directory (with its copy of the shared dict) is a data dir.
    # (sample_break_mode="eos" trips over np.compat, gone in numpy 2, inside fairseq-fixed.)
    cfg = LanguageModelingConfig(data=str(out / "code_python"), tokens_per_sample=64,
                                 sample_break_mode="none", dataset_impl="mmap", seed=1, batch_size=2,
                                 batch_size_valid=2, data_buffer_size=0, tpu=False,
                                 use_plasma_view=False, plasma_path=None)
    task = LanguageModelingTask.setup_task(cfg)
    assert task.dictionary.symbols == dp.load_dictionary(out).symbols
    task.load_dataset("valid")
    ds = task.dataset("valid")
    assert sum(ds.sizes) == prepared[1]["datasets"]["code_python/valid"]["tokens"]
    sample = ds.collater([ds[0], ds[1]])
    assert sample["net_input"]["src_tokens"].shape[0] == 2 and sample["ntokens"] > 0


@pytest.mark.parametrize("text", [
    "plain English text.",
    "  leading and trailing spaces   \n\n\n   indented\n",
    "def f(x):\n\tif x:\n\t\treturn x  # tabs\r\n    else:\t\tpass\n",
    "unicode: ünïcødé, 日本語のテキスト, Ελληνικά, emoji 🎉🧪, math ∑∫√, rtl שלום",
    "sentencepiece's own marker ▁ and ▁▁ and ▁x▁, block chars ▁▂▃▄▅▆▇█",
    "control \x00\x01\x7f and form feed \x0c and vertical tab \x0b and nbsp \xa0 and \u2028 sep",
    "<s> </s> <pad> <unk> look like specials but are text",
    "",
])
def test_encode_decode_round_trip(prepared, dp, text):
    out, _ = prepared
    ids = dp.encode_text(out, text)
    assert all(isinstance(i, int) and 0 <= i < VOCAB for i in ids)
    assert dp.EOS_ID not in ids and dp.BOS_ID not in ids and dp.PAD_ID not in ids
    assert dp.decode_ids(out, ids) == text


def test_round_trip_property(prepared, dp):
    from hypothesis import given, settings, strategies as st

    out, _ = prepared

    @settings(max_examples=60, deadline=None)
    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
    def check(text):
        assert dp.decode_ids(out, dp.encode_text(out, text)) == text

    check()


def test_decode_rejects_ids_outside_vocab(prepared, dp):
    out, _ = prepared
    with pytest.raises(BtmError, match="outside the vocabulary"):
        dp.decode_ids(out, [5, VOCAB + 3])


# ---------------------------------------------------------------------------- re-runs


def test_rerun_skips_finished_domains(prepared, small_corpus, dp, monkeypatch):
    out, manifest = prepared
    before = output_files(out)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a no-op re-run trained or binarized something")

    # fast because it does no work: no tokenizer training, no encoding, no worker processes
    from fairseq_ext import binarize, spm_tokenizer

    for module, name in ((spm_tokenizer, "_train_spm"), (spm_tokenizer, "_tokenizer_sample"),
                         (binarize, "binarize_shard"), (binarize, "ProcessPoolExecutor")):
        monkeypatch.setattr(module, name, must_not_run)
    t0 = time.perf_counter()
    again = dp.prepare_data(small_corpus, out, vocab_size=VOCAB, workers=2, progress=False)
    elapsed = time.perf_counter() - t0
    assert again == manifest
    # nothing rewritten (same files, same mtimes) but the shard plan, which now lists no work
    assert {k: v for k, v in output_files(out).items() if k != "shards.one_job.json"} == \
        {k: v for k, v in before.items() if k != "shards.one_job.json"}
    assert json.loads((out / "shards.one_job.json").read_text())["shards"] == []
    assert elapsed < 30, f"a no-op re-run took {elapsed:.1f}s"  # only hashing; generous for CI


def test_same_seed_gives_same_bytes_regardless_of_workers(prepared, small_corpus, dp, tmp_path):
    out, manifest = prepared
    other = dp.prepare_data(small_corpus, tmp_path / "d", vocab_size=VOCAB, workers=1, progress=False)
    assert other["spm_model_sha256"] == manifest["spm_model_sha256"]
    assert other["data_hash"] == manifest["data_hash"]


@pytest.fixture()
def scratch(prepared, small_corpus, tmp_path):
    """A private copy of the corpus and of the prepared data, for tests that change them."""
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    out = tmp_path / "data"
    shutil.copytree(prepared[0], out)
    return corpus, out


def test_changed_tokenizer_settings_are_an_error_unless_overwrite(scratch, dp):
    corpus, out = scratch
    before = output_files(out)
    with pytest.raises(BtmError, match=r"vocab_size: 500 -> 520.*--overwrite"):
        dp.prepare_data(corpus, out, vocab_size=520, progress=False)
    assert output_files(out) == before
    # the tokenizer's training text changed: also an error
    with (corpus / "legal" / "train.jsonl").open("a") as f:
        f.write(json.dumps({"text": "A new clause."}) + "\n")
    with pytest.raises(BtmError, match="train split of 'legal' changed"):
        dp.prepare_data(corpus, out, vocab_size=VOCAB, progress=False)
    manifest = dp.prepare_data(corpus, out, vocab_size=520, overwrite=True, workers=1, progress=False)
    assert manifest["vocab_size"] == 520 and len(dp.load_dictionary(out)) == 520
    assert manifest["datasets"]["legal/train"]["documents"] == 61


def test_changed_eval_split_rebuilds_only_that_domain(scratch, dp):
    corpus, out = scratch
    before = output_files(out)
    with (corpus / "legal" / "valid.jsonl").open("a") as f:
        f.write(json.dumps({"text": "One more validation document."}) + "\n")
    manifest = dp.prepare_data(corpus, out, vocab_size=VOCAB, workers=1, progress=False)
    after = output_files(out)
    assert manifest["datasets"]["legal/valid"]["documents"] == 9
    assert after["legal/valid.bin"] != before["legal/valid.bin"]
    assert after["bible/valid.bin"] == before["bible/valid.bin"]
    assert after["spm.model"] == before["spm.model"]


def test_adding_an_eval_domain_keeps_the_tokenizer(scratch, dp):
    corpus, out = scratch
    before = output_files(out)
    for split in ("train", "valid", "test"):
        write_jsonl(corpus / "extra" / f"{split}.jsonl", [f"An extra {split} document, number {i}." for i in range(3)])
    with pytest.raises(BtmError, match="train_domains"):  # by default every domain trains the tokenizer
        dp.prepare_data(corpus, out, vocab_size=VOCAB, workers=1, progress=False)
    manifest = dp.prepare_data(corpus, out, train_domains=["bible", "code_python", "legal"],
                               vocab_size=VOCAB, workers=1, progress=False)
    assert manifest["domains"] == ["bible", "code_python", "extra", "legal"]
    after = output_files(out)
    rewritten = ("manifest.json", "tokens.csv", "shards.one_job.json")
    assert {k: v for k, v in after.items() if not k.startswith("extra/") and k not in rewritten} == \
        {k: v for k, v in before.items() if k not in rewritten}


def test_tampered_output_is_rebuilt(scratch, dp):
    corpus, out = scratch
    good = sha256_file(out / "bible" / "valid.bin")
    with (out / "bible" / "valid.bin").open("r+b") as f:
        f.write(b"\xff\xff")
    (out / "code_python" / "test.idx").unlink()
    dp.prepare_data(corpus, out, vocab_size=VOCAB, workers=1, progress=False)
    assert sha256_file(out / "bible" / "valid.bin") == good
    assert (out / "code_python" / "test.idx").is_file()


def test_failed_run_leaves_no_partial_outputs(scratch, dp, monkeypatch):
    from fairseq_ext import spm_tokenizer  # the sentencepiece encoder binarize writes with

    corpus, out = scratch
    shutil.rmtree(out / "legal")
    calls = {"n": 0}
    real_encode = spm_tokenizer.encode_with

    def failing_encode(sp, text):
        calls["n"] += 1
        if calls["n"] == 70:  # in legal/test, after legal/train and legal/valid were built
            raise RuntimeError("disk on fire")
        return real_encode(sp, text)

    monkeypatch.setattr(spm_tokenizer, "encode_with", failing_encode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        dp.prepare_data(corpus, out, vocab_size=VOCAB, workers=1, progress=False)
    leftovers = [p.name for p in (out / "legal").iterdir()] if (out / "legal").exists() else []
    assert not [n for n in leftovers if n.endswith((".bin", ".idx", ".tmp"))], leftovers
    manifest = read_data_manifest(out)
    assert "legal" not in manifest["domains"] and "legal/train" not in manifest["data_hash"]
    monkeypatch.setattr(spm_tokenizer, "encode_with", real_encode)
    manifest = dp.prepare_data(corpus, out, vocab_size=VOCAB, workers=1, progress=False)
    assert "legal" in manifest["domains"]


def test_killed_run_leaves_no_partial_outputs_and_resumes(scratch, prepared, dp):
    corpus, out = scratch
    shutil.rmtree(out / "legal")
    # A real SIGKILL in the middle of the third shard of legal (its .bin temp file complete,
    # its index not yet written); shards of 400 bytes cut legal into several per split.
    script = (
        "import os, signal\n"
        "from fairseq_ext import binarize\n"
        "from fairseq_ext.data_prep import prepare_data\n"
        "calls = []\n"
        "def die(*args):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*args)\n"
        "real, binarize.write_index = binarize.write_index, die\n"
        f"prepare_data({str(corpus)!r}, {str(out)!r}, vocab_size={VOCAB}, workers=1, progress=False, shard_bytes=400)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == -9, proc.stderr
    shard_dir = out / ".shards" / "legal" / "test"
    visible = sorted(p.name for p in shard_dir.iterdir() if not p.name.startswith("."))
    assert visible == ["00000.bin", "00000.idx", "00000.json", "00001.bin", "00001.idx", "00001.json"], visible
    assert [p.name for p in shard_dir.iterdir() if p.name.startswith(".00002.")], "the killed shard's temp files"
    assert not (out / "legal").exists() or not list((out / "legal").glob("*.bin"))
    assert "legal" not in read_data_manifest(out)["domains"]
    manifest = dp.prepare_data(corpus, out, vocab_size=VOCAB, workers=1, progress=False, shard_bytes=400)
    assert manifest["data_hash"] == prepared[1]["data_hash"], "sharded and resumed: the same bytes"
    assert manifest["datasets"]["legal/train"]["shards"] > 3
    assert not list(out.rglob(".*.tmp")), "the re-run cleans up the killed run's temp files"
    assert not list((out / ".shards").rglob("*.*")), "merged shards are removed"



# ---------------------------------------------------------------------------- bad input


def write_jsonl(path: Path, texts) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def make_corpus(root: Path, domains=("alpha", "beta")) -> Path:
    for i, d in enumerate(domains):
        for split in ("train", "valid", "test"):
            write_jsonl(root / d / f"{split}.jsonl", [f"{d} {split} document {j} " * 20 for j in range(5)])
    return root


def _bad_utf8(c):
    (c / "beta" / "valid.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')


def _bad_json(c):
    (c / "beta" / "test.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n', encoding="utf-8")


def _missing_field(c):
    (c / "alpha" / "train.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")


def _not_a_string(c):
    (c / "alpha" / "valid.jsonl").write_text('{"text": 42}\n', encoding="utf-8")


def _not_an_object(c):
    (c / "alpha" / "valid.jsonl").write_text('["text"]\n', encoding="utf-8")


def _missing_split(c):
    (c / "beta" / "test.jsonl").unlink()


def _empty_file(c):
    (c / "beta" / "valid.jsonl").write_text("", encoding="utf-8")


def _only_empty_docs(c):
    (c / "beta" / "valid.jsonl").write_text('{"text": ""}\n\n', encoding="utf-8")


def _empty_domain(c):
    (c / "gamma").mkdir()


def _two_formats(c):
    (c / "alpha" / "train.txt").write_text("doc\n", encoding="utf-8")


def _bad_gzip(c):
    (c / "beta" / "valid.jsonl").unlink()
    (c / "beta" / "valid.jsonl.gz").write_bytes(b"not gzip at all")


@pytest.mark.parametrize("breaker, expected", [
    (_bad_utf8, r"beta/valid\.jsonl:2: not valid UTF-8 \(byte 0xe9"),
    (_bad_json, r"beta/test\.jsonl:2: not a JSON object"),
    (_missing_field, r"alpha/train\.jsonl:2: missing text field 'text' \(fields: 'body'\)"),
    (_not_a_string, r"alpha/valid\.jsonl:1: field 'text' is int"),
    (_not_an_object, r"alpha/valid\.jsonl:1: expected a JSON object"),
    (_missing_split, r"domain 'beta' has no test split"),
    (_empty_file, r"beta/valid\.jsonl is empty"),
    (_only_empty_docs, r"beta/valid\.jsonl holds no documents"),
    (_empty_domain, r"domain 'gamma' has no train split"),
    (_two_formats, r"alpha.*train split in several files"),
    (_bad_gzip, r"could not read .*beta/valid\.jsonl\.gz"),
])
def test_bad_corpus_is_one_clear_error_and_writes_nothing(dp, tmp_path, breaker, expected):
    corpus = make_corpus(tmp_path / "corpus")
    breaker(corpus)
    out = tmp_path / "data"
    with pytest.raises(BtmError, match=expected):
        dp.prepare_data(corpus, out, vocab_size=300, workers=1, progress=False)
    if out.exists():
        written = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
        # at most a complete tokenizer (errors in valid/test surface while binarizing); never a
        # dataset of a broken domain, never a temp file
        assert not [w for w in written if w.startswith("beta")]
        assert not [w for w in written if w.endswith(".tmp")]


@pytest.mark.parametrize("name", ["a/b", "..", "a b", "a\nb", "a;rm -rf", "$(x)", "-dash", ""])
def test_bad_domain_names_in_options(dp, tmp_path, name):
    corpus = make_corpus(tmp_path / "corpus")
    with pytest.raises(BtmError, match=r"invalid domain name|--domains is empty"):
        dp.prepare_data(corpus, tmp_path / "data", domains=["alpha", name], progress=False)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("dirname", ["a b", "a\nb", "semi;colon", "$(x)", "quote'"])
def test_bad_domain_directory_names(dp, tmp_path, dirname):
    corpus = make_corpus(tmp_path / "corpus", domains=("alpha", dirname))
    with pytest.raises(BtmError, match=r"invalid domain name"):
        dp.prepare_data(corpus, tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("kwargs, expected", [
    ({"domains": ["alpha", "nope"]}, r"domain 'nope' not found"),
    ({"train_domains": ["nope"]}, r"--train-domains: domain 'nope' not found"),
    ({"vocab_size": 10}, r"invalid vocab_size 10"),
    ({"workers": 0}, r"invalid workers 0"),
    ({"vocab_size": 50000}, r"sentencepiece could not train vocab_size=50000"),
])
def test_bad_options(dp, tmp_path, kwargs, expected):
    corpus = make_corpus(tmp_path / "corpus")
    with pytest.raises(BtmError, match=expected):
        dp.prepare_data(corpus, tmp_path / "data", progress=False, **kwargs)
    assert not list((tmp_path / "data").glob("*.model"))


def test_empty_or_missing_corpus_dir(dp, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BtmError, match=r"empty.*one subdirectory per domain"):
        dp.prepare_data(tmp_path / "empty", tmp_path / "data", progress=False)
    with pytest.raises(BtmError, match=r"does not exist"):
        dp.prepare_data(tmp_path / "missing", tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


def test_txt_gz_and_custom_field_inputs(dp, tmp_path):
    corpus = tmp_path / "corpus"
    for split in ("train", "valid", "test"):
        (corpus / "plain").mkdir(parents=True, exist_ok=True)
        (corpus / "plain" / f"{split}.txt").write_text(
            f"first {split} doc\nsecond line\n\n  \n\nsecond {split} doc\n\n", encoding="utf-8")
        (corpus / "zipped").mkdir(exist_ok=True)
        with gzip.open(corpus / "zipped" / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            for j in range(3):
                f.write(json.dumps({"body": f"zipped {split} {j}\twith tab", "id": j}) + "\n")
    with pytest.raises(BtmError, match="missing text field 'text'"):
        dp.prepare_data(corpus, tmp_path / "bad", vocab_size=300, progress=False)
    # a .txt file has no fields, so --text-field only matters for the jsonl domain
    out = tmp_path / "data"
    manifest = dp.prepare_data(corpus, out, vocab_size=300, text_field="body", workers=1, progress=False)
    assert manifest["datasets"]["plain/valid"]["documents"] == 2
    assert manifest["datasets"]["zipped/test"]["documents"] == 3
    from fairseq.data import data_utils

    ds = data_utils.load_indexed_dataset(str(out / "plain" / "valid"), dp.load_dictionary(out), "mmap")
    assert dp.decode_ids(out, ds[0].tolist()) == "first valid doc\nsecond line"
    ds = data_utils.load_indexed_dataset(str(out / "zipped" / "train"), dp.load_dictionary(out), "mmap")
    assert dp.decode_ids(out, ds[2].tolist()) == "zipped train 2\twith tab"


# ---------------------------------------------------------------------------- the CLI


def test_cli_prepare_and_errors(tmp_path):
    require_fairseq()
    corpus = make_corpus(tmp_path / "corpus")
    proc = run_btm("data", "prepare", corpus, tmp_path / "data", "--vocab-size", "300", "--workers", "1",
                   "--train-domains", "alpha")
    assert proc.returncode == 0, proc.stderr
    assert "alpha/train" in proc.stdout and (tmp_path / "data" / "beta" / "test.idx").is_file()
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["train_domains"] == ["alpha"] and manifest["domains"] == ["alpha", "beta"]
    (corpus / "beta" / "valid.jsonl").write_bytes(b"\xff\n")
    proc = run_btm("data", "prepare", corpus, tmp_path / "data2", "--vocab-size", "300")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("btm: error: ")
    assert "beta/valid.jsonl:1: not valid UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help():
    proc = run_btm("data", "prepare", "--help")
    assert proc.returncode == 0 and "--train-domains" in proc.stdout and "--vocab-size" in proc.stdout
    proc = run_btm("data")
    assert proc.returncode == 2 and "btm data prepare" in proc.stderr


def test_error_in_a_worker_process_reaches_the_caller(dp, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", domains=("alpha", "beta", "gamma"))
    _bad_utf8(corpus)
    with pytest.raises(BtmError, match=r"beta/valid\.jsonl:2: not valid UTF-8"):
        dp.prepare_data(corpus, tmp_path / "data", vocab_size=300, workers=2, progress=False)
    manifest = read_data_manifest(tmp_path / "data")
    assert not any(k.startswith("beta/") for k in manifest["datasets"])


def test_many_rare_characters_fit_a_small_vocabulary(dp, tmp_path):
    """Thousands of distinct CJK characters would need more pieces than vocab_size=300 has."""
    corpus = tmp_path / "corpus"
    text = "".join(chr(0x4E00 + i) for i in range(3000))
    for split in ("train", "valid", "test"):
        write_jsonl(corpus / "cjk" / f"{split}.jsonl", [text[i:i + 300] + " common words here" for i in range(0, 3000, 300)])
    manifest = dp.prepare_data(corpus, tmp_path / "data", vocab_size=300, workers=1, progress=False)
    assert manifest["rare_characters_cut_from_sample"] > 2900
    assert dp.decode_ids(tmp_path / "data", dp.encode_text(tmp_path / "data", text)) == text


def test_tokenizer_sample_is_a_seeded_random_subset_read_in_one_pass(dp, tmp_path):
    import random

    from fairseq_ext.spm_tokenizer import _choose_documents

    path = tmp_path / "train.jsonl"
    docs = [f"document {i:04d} " + "x" * 86 for i in range(1000)]  # 100 characters each
    write_jsonl(path, docs)
    pick = _choose_documents(path, "text", random.Random("1:a"), 5000)
    assert len(pick) == 50 and set(pick) <= set(docs) and len(set(pick)) == 50
    assert pick == _choose_documents(path, "text", random.Random("1:a"), 5000)
    assert pick != _choose_documents(path, "text", random.Random("2:a"), 5000)
    first_half = sum(int(d.split()[1]) < 500 for d in pick)
    assert 10 <= first_half <= 40  # spread over the file, not its head
    assert sorted(_choose_documents(path, "text", random.Random("1:a"), 10**9)) == docs
