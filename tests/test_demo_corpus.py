"""The built-in demo corpus (launcher/demo_corpus.py): offline, deterministic, distinct domains."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, require_fairseq, run_btm
from launcher.demo_corpus import DEMO_EVAL_DOMAINS, DEMO_TRAIN_DOMAINS, DOMAINS, build_demo_corpus
from launcher.contract.errors import BtmError

SMALL = 60_000


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    description = build_demo_corpus(out, size=SMALL)
    return out, description, time.perf_counter() - t0


def read_split(out: Path, domain: str, split: str) -> list[str]:
    lines = (out / domain / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_domains_and_roles(demo):
    out, description, _ = demo
    assert len(DEMO_TRAIN_DOMAINS) >= 4 and 1 <= len(DEMO_EVAL_DOMAINS) <= 2
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(d.name for d in DOMAINS)
    assert description["train_domains"] == list(DEMO_TRAIN_DOMAINS)
    assert json.loads((out / "demo_corpus.json").read_text()) == description


def test_every_split_nonempty_and_documents_distinct_across_splits(demo):
    out, description, _ = demo
    for domain in description["domains"]:
        seen: dict[str, str] = {}
        total = 0
        for split in ("train", "valid", "test"):
            docs = read_split(out, domain, split)
            assert docs and all(d.strip() for d in docs), f"{domain}/{split} is empty"
            assert len(docs) == description["domains"][domain]["documents"][split]
            for d in docs:
                assert d not in seen, f"{domain}: a document is in both {seen.get(d)} and {split}"
                seen[d] = split
            total += sum(map(len, docs))
        counts = description["domains"][domain]["documents"]
        assert counts["train"] > counts["valid"] + counts["test"]  # ~90/5/5
        assert total == description["domains"][domain]["characters"]
        if domain != "reference_manual":  # the manual is ~0.46 M characters in all
            assert SMALL <= total < SMALL + 5000


def test_deterministic_bytes(demo, tmp_path):
    out, _, _ = demo
    build_demo_corpus(tmp_path, size=SMALL)
    for path in sorted(out.rglob("*.jsonl")):
        assert (tmp_path / path.relative_to(out)).read_bytes() == path.read_bytes(), path
    assert (tmp_path / "demo_corpus.json").read_bytes() == (out / "demo_corpus.json").read_bytes()


def test_deterministic_across_processes_with_different_hash_seeds(tmp_path):
    # str hashing (set order) is randomized per process; the corpus must not depend on it
    code = ("import sys; from launcher.demo_corpus import build_demo_corpus; "
            "build_demo_corpus(sys.argv[1], size=20000)")
    for i, seed in enumerate(("1", "2")):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(i))], cwd=REPO, check=True,
                       env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)})
    for path in sorted((tmp_path / "0").rglob("*.jsonl")):
        other = tmp_path / "1" / path.relative_to(tmp_path / "0")
        assert other.read_bytes() == path.read_bytes(), path


def test_seed_changes_the_generated_domains(tmp_path):
    build_demo_corpus(tmp_path / "a", size=5000, seed=0)
    build_demo_corpus(tmp_path / "b", size=5000, seed=1)
    a = (tmp_path / "a" / "arithmetic" / "train.jsonl").read_bytes()
    assert a != (tmp_path / "b" / "arithmetic" / "train.jsonl").read_bytes()


def test_domains_are_different_from_each_other(demo):
    """Character-trigram profiles: each domain is closer to itself (valid) than to any other."""
    from collections import Counter
    import math

    out, description, _ = demo

    def profile(texts):
        c = Counter()
        for t in texts:
            c.update(t[i:i + 3] for i in range(len(t) - 2))
        norm = math.sqrt(sum(v * v for v in c.values()))
        return {k: v / norm for k, v in c.items()}

    def cosine(p, q):
        return sum(v * q.get(k, 0.0) for k, v in p.items())

    train = {d: profile(read_split(out, d, "train")) for d in description["domains"]}
    for d in description["domains"]:
        held_out = profile(read_split(out, d, "valid") + read_split(out, d, "test"))
        best = max(train, key=lambda other: cosine(held_out, train[other]))
        assert best == d, f"held-out {d} looks most like {best}"


def test_default_size_builds_in_a_few_seconds(tmp_path):
    t0 = time.perf_counter()
    description = build_demo_corpus(tmp_path)
    elapsed = time.perf_counter() - t0
    # about 3 s of CPU; the bound is generous because CI machines are shared and slow
    assert elapsed < 60, f"building the default demo corpus took {elapsed:.1f}s"
    sizes = {d: info["characters"] for d, info in description["domains"].items()}
    assert all(v >= 1_000_000 for d, v in sizes.items() if d != "reference_manual"), sizes
    assert sizes["reference_manual"] > 400_000


def test_bytecode_listings_have_no_addresses_or_paths(demo):
    out, _, _ = demo
    text = "\n".join(read_split(out, "bytecode", "train"))
    assert " at 0x" not in text and str(Path(sys.prefix)) not in text
    assert "LOAD_" in text


def test_python_code_has_no_docstrings_and_docstrings_have_names(demo):
    out, _, _ = demo
    code = read_split(out, "python_code", "train")
    assert any("def " in d for d in code)
    docs = read_split(out, "docstrings", "train")
    assert all("\n\n" in d or len(d) < 200 for d in docs)


def test_no_fairseq_or_torch_imported():
    code = ("import sys\n"
            "class B:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('fairseq', 'torch', 'sentencepiece', 'numpy'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, B())\n"
            "import tempfile, launcher.demo_corpus as d\n"
            "d.build_demo_corpus(tempfile.mkdtemp(), size=5000)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr


def test_bad_size_is_a_clear_error(tmp_path):
    with pytest.raises(BtmError, match="invalid demo corpus size"):
        build_demo_corpus(tmp_path, size=10)
    assert not list(tmp_path.iterdir())


def test_cli_writes_a_corpus_that_data_prepare_reads(tmp_path):
    proc = run_btm("data", "demo-corpus", tmp_path / "corpus", "--size", "20000")
    assert proc.returncode == 0, proc.stderr
    assert "reference_manual" in proc.stdout
    require_fairseq()
    from fairseq_ext.data_prep import prepare_data

    manifest = prepare_data(tmp_path / "corpus", tmp_path / "data", vocab_size=600, workers=1,
                            train_domains=list(DEMO_TRAIN_DOMAINS), progress=False)
    assert manifest["domains"] == sorted(d.name for d in DOMAINS)
    assert manifest["train_domains"] == sorted(DEMO_TRAIN_DOMAINS)
