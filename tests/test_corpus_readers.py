"""One definition of a document: ``btm data prepare`` and c-BTM read a corpus the same way.

One tricky corpus (byte-order marks, CRLF, empty and whitespace-only texts, blank jsonl lines,
.txt files with runs of blank lines, .jsonl.gz, line breaks inside texts, documents in the
field ``body`` beside a decoy ``text``) is read by the reference reader, by c-BTM (its
numbering, its clustered corpus) and, with fairseq, by data prep before and after clustering.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import require_fairseq
from fairseq_ext.cluster import build_cluster_domains
from launcher.contract.corpus import find_sources, find_split_file, iter_corpus, read_documents

BOM = b"\xef\xbb\xbf"
FIELD = "body"
WORDS = ("lord god israel unto thee king jerusalem def return class import self license "
         "copyright warranty liability software permission distribute").split()


def _filler(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(n)]


def _jsonl(rows: list, newline: str = "\n") -> bytes:
    """rows: a dict per JSON line, or a str written as it is (blank lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    return "".join(line + newline for line in lines).encode("utf-8")


def write_tricky_corpus(root: Path) -> dict[str, list[str]]:
    """Write the corpus; return the documents each split holds, keyed ``domain/split`` in
    corpus order (domains sorted, then train, valid, test)."""
    rng = random.Random(0)
    expected = {}

    # alpha/train.jsonl: BOM, CRLF, blank lines, an empty text, a whitespace-only text, line
    # breaks inside texts (escaped CRLF, U+2028, U+0085), a decoy "text" field.
    tricky = ["   \t ", "def return self\r\nclass import", "license copyright\u2028warranty \x85 end"]
    filler = _filler(rng, 10)
    rows = [{FIELD: filler[0], "text": "decoy"}, {FIELD: ""}, "", "   ", *({FIELD: t} for t in tricky),
            *({FIELD: t} for t in filler[1:])]
    _put(root / "alpha" / "train.jsonl", BOM + _jsonl(rows, "\r\n"))
    expected["alpha/train"] = [filler[0], *tricky, *filler[1:]]

    # alpha/valid.txt: BOM, CRLF, runs of blank and whitespace-only lines, a lone CR in a line.
    _put(root / "alpha" / "valid.txt", BOM + b"lord god\r\nunto thee\r\n\r\n\r\n   \r\n\t\r\n"
         b"def return\rself\r\n  class indented\r\n\r\n\r\nlicense warranty\r\n\r\n")
    expected["alpha/valid"] = ["lord god\nunto thee", "def return\rself\n  class indented", "license warranty"]

    # alpha/test.jsonl.gz: a BOM inside the gzip stream, empty texts first and last.
    docs = _filler(rng, 3)
    _put(root / "alpha" / "test.jsonl.gz",
         gzip.compress(BOM + _jsonl([{FIELD: ""}, *({FIELD: d} for d in docs), {FIELD: ""}])))
    expected["alpha/test"] = docs

    # beta/train.txt: LF, several blank lines between documents, none at the end of the file.
    docs = _filler(rng, 8)
    _put(root / "beta" / "train.txt", "\n\n\n".join(docs).encode("utf-8"))
    expected["beta/train"] = docs

    docs = _filler(rng, 2)
    _put(root / "beta" / "valid.jsonl.gz", gzip.compress(_jsonl([{FIELD: d} for d in docs])))
    expected["beta/valid"] = docs

    docs = [*_filler(rng, 2), "  "]
    _put(root / "beta" / "test.jsonl", BOM + _jsonl(["", *({FIELD: d} for d in docs), ""], "\r\n"))
    expected["beta/test"] = docs
    return expected


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)[FIELD] for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def _split_of(expected: dict, split: str) -> list[str]:
    return [doc for key, docs in expected.items() if key.endswith("/" + split) for doc in docs]


def test_cbtm_numbers_and_clusters_the_documents_data_prep_reads(tmp_path):
    corpus = tmp_path / "corpus"
    expected = write_tricky_corpus(corpus)
    for key, docs in expected.items():  # the reference reader, as data prep calls it
        assert read_documents(find_split_file(corpus, *key.split("/")), FIELD) == docs, key

    sources = find_sources(corpus)
    assert [s.key for s in sources] == list(expected)
    everything = list(iter_corpus(sources, FIELD))
    numbered = [(sources[d.source].key, d.index, d.text) for d in everything]
    assert numbered == [(key, i, doc) for key, docs in expected.items() for i, doc in enumerate(docs)]
    counts = [len(docs) for docs in expected.values()]  # a slice skips whole sources unread
    assert list(iter_corpus(sources, FIELD, start=14, stop=27, counts=counts)) == everything[14:27]

    # k = 1: the clustered corpus is the whole corpus, in corpus order, in the field "body".
    one = build_cluster_domains(corpus, tmp_path / "one", 1, dims=4, text_field=FIELD)
    domain = Path(one["corpus_dir"]) / "cluster_0"
    for split in ("train", "valid", "test"):
        assert _jsonl_texts(domain / f"{split}.jsonl") == _split_of(expected, split), split
    with np.load(Path(one["corpus_dir"]) / "assignments.npz", allow_pickle=False) as z:
        rows = list(zip(z["source"].tolist(), z["index"].tolist()))
    assert [(sources[s].key, i) for s, i in rows] == [(k, i) for k, i, _ in numbered]

    # k = 2 in 1 or 5 shards (shard boundaries fall inside sources): the same files.
    whole = build_cluster_domains(corpus, tmp_path / "whole", 2, dims=4, text_field=FIELD)
    sharded = build_cluster_domains(corpus, tmp_path / "sharded", 2, dims=4, text_field=FIELD, num_shards=5)
    for c in whole["domains"]:
        for split in ("train", "valid", "test"):
            name = Path(c) / f"{split}.jsonl"
            assert (Path(sharded["corpus_dir"]) / name).read_bytes() == (Path(whole["corpus_dir"]) / name).read_bytes()
    for split in ("train", "valid", "test"):
        got = [t for c in whole["domains"] for t in _jsonl_texts(Path(whole["corpus_dir"]) / c / f"{split}.jsonl")]
        assert sorted(got) == sorted(_split_of(expected, split)), split


@pytest.mark.fairseq
def test_clusters_of_a_body_field_corpus_prepare_to_the_corpus_documents(tmp_path):
    """End to end with text_field="body": data prep of the corpus, c-BTM, data prep of the
    clusters. Both preparations hold exactly the corpus's documents."""
    require_fairseq()
    from fairseq.data import data_utils

    from fairseq_ext.data_prep import decode_ids, load_dictionary, prepare_data

    def prepared_documents(data_dir: Path, domain: str, split: str) -> list[str]:
        ds = data_utils.load_indexed_dataset(str(data_dir / domain / split), load_dictionary(data_dir), "mmap")
        return [decode_ids(data_dir, ds[i].tolist()) for i in range(len(ds))]

    corpus = tmp_path / "corpus"
    expected = write_tricky_corpus(corpus)
    prepare_data(corpus, tmp_path / "data", vocab_size=300, text_field=FIELD, workers=1, progress=False)
    for key, docs in expected.items():
        assert prepared_documents(tmp_path / "data", *key.split("/")) == docs, key

    clusters = build_cluster_domains(corpus, tmp_path / "clusters", 2, dims=4, text_field=FIELD)
    manifest = prepare_data(clusters["corpus_dir"], tmp_path / "cdata", vocab_size=300, text_field=FIELD,
                            workers=1, progress=False)
    assert manifest["domains"] == ["cluster_0", "cluster_1"]
    for split in ("train", "valid", "test"):
        got = [doc for c in clusters["domains"] for doc in prepared_documents(tmp_path / "cdata", c, split)]
        assert sorted(got) == sorted(_split_of(expected, split)), split
