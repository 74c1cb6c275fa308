"""``btm data prepare``: one shared tokenizer and one fairseq dataset per (domain, split).

Data flow (contract: "Data" in docs/architecture.md; user guide: docs/data.md)::

    CORPUS/<domain>/<split>.{jsonl,jsonl.gz,txt}
      -> balanced sample of the training domains' train splits -> spm.model, spm.vocab
      -> dict.txt (fairseq Dictionary; symbol i == sentencepiece piece i)
      -> DATA/<domain>/<split>.bin|.idx (mmap indexed dataset, one item per document + eos)
         and DATA/<domain>/dict.txt (a copy, so stock fairseq tools read DATA/<domain>)
      -> tokens.csv, manifest.json

Tokenizer choices (why): sentencepiece BPE with byte fallback, identity normalization, no
whitespace squashing and no dummy prefix, so ``decode(encode(text)) == text`` for any
Unicode string. The sample is fed line by line, so ``\\n`` and the other line breaks never
enter a learned piece: they are encoded by their byte pieces (``<0x0A>``), which keeps
``dict.txt`` (one symbol per line) well formed. Runs of spaces become ``▁▁▁▁`` pieces; tabs are
ordinary characters. The one character sentencepiece cannot carry literally is U+2581 ``▁``
(its own space marker), so :func:`encode_text` writes it as its three byte pieces.

The sentencepiece ids are laid out as fairseq expects (bos=0, pad=1, eos=2, unk=3), so a
sentencepiece id *is* the fairseq id and ``dict.txt`` lists the remaining pieces in id order.

Re-runs: a domain is skipped when the manifest says it was built from the same input bytes
with the same tokenizer and its .bin/.idx still hash to the recorded values. A re-run whose
tokenizer settings or tokenizer training data differ from the manifest's is an error (the
existing data may already be used by trained experts) unless ``overwrite=True``, which
rebuilds everything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.contract.atomic import (atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text,
                             sha256_file)
from launcher.contract.data_manifest import MANIFEST, FORMAT_VERSION, read_data_manifest, write_data_manifest
from launcher.contract.errors import BtmError
from launcher.contract.logging_setup import quiet_third_party_logging
from launcher.contract.names import validate_name

from launcher.contract.corpus import SPLITS, find_split_file, iter_documents, list_domains

# fairseq's Dictionary() reserves these ids; sentencepiece is trained to use the same ones.
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
N_SPECIAL = 4
# sentencepiece skips training sentences longer than max_sentence_length bytes; we cut lines
# into chunks of this many characters instead (4 bytes per character at most).
_MAX_LINE_CHARS = 4096
_SPACE_MARK = "\u2581"  # sentencepiece's whitespace symbol "▁"


@dataclass(frozen=True)
class TokenizerSettings:
    """Everything the tokenizer depends on besides the bytes of the training files."""

    vocab_size: int = field(default=8000, metadata={"help": "sentencepiece vocabulary size (= fairseq dictionary size)"})
    train_domains: tuple[str, ...] = field(default=(), metadata={"help": "domains whose train split trains the tokenizer"})
    sample_chars: int = field(default=1_000_000, metadata={"help": "cap on characters sampled per training domain; every domain contributes the same number (the smallest domain's size when below the cap)"})
    seed: int = field(default=1, metadata={"help": "seed of the document shuffle that picks the sample"})
    character_coverage: float = field(default=0.9995, metadata={"help": "share of sample characters that get their own piece; rarer ones use byte pieces"})
    text_field: str = field(default="text", metadata={"help": "JSON field holding the document text"})

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train_domains"] = list(self.train_domains)
        return d


# --------------------------------------------------------------------------------------------
# Public API


def prepare_data(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 domains: list[str] | None = None, train_domains: list[str] | None = None,
                 vocab_size: int = 8000, text_field: str = "text", workers: int = 2, seed: int = 1,
                 sample_chars: int = 1_000_000, character_coverage: float = 0.9995,
                 overwrite: bool = False, progress: bool | None = None) -> dict:
    """Prepare ``out_dir`` from ``corpus_dir`` and return the manifest (see module docstring).

    ``domains`` selects corpus domains (default: all subdirectories); ``train_domains`` (default:
    ``domains``) train the tokenizer. ``progress`` shows tqdm bars (default: when stderr is a TTY).
    """
    import filelock

    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    available = list_domains(corpus_dir)
    domains = _check_domains(domains or available, available, corpus_dir,
                             "--domains" if domains else f"domain directory of {corpus_dir}")
    train_domains = _check_domains(train_domains or domains, domains, corpus_dir, "--train-domains")
    _check_positive("vocab_size", vocab_size, minimum=N_SPECIAL + 256 + 1)
    _check_positive("workers", workers)
    _check_positive("sample_chars", sample_chars)
    if not isinstance(text_field, str) or not text_field:
        raise BtmError(f"invalid text field {text_field!r}: give a non-empty JSON field name")
    if not 0.98 <= character_coverage <= 1.0:  # sentencepiece's own limits
        raise BtmError(f"invalid character_coverage {character_coverage!r}: use a value in [0.98, 1.0]")
    if progress is None:
        progress = sys.stderr.isatty()

    # Fail on structural problems (missing/empty split files) before writing anything.
    sources = {(d, s): find_split_file(corpus_dir, d, s) for d in domains for s in SPLITS}
    settings = TokenizerSettings(vocab_size=vocab_size, train_domains=tuple(train_domains),
                                 sample_chars=sample_chars, seed=seed,
                                 character_coverage=character_coverage, text_field=text_field)

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out_dir / ".prepare.lock"))
    try:
        lock.acquire(timeout=5)
    except filelock.Timeout:
        raise BtmError(f"{out_dir} is being prepared by another process (lock {lock.lock_file})") from None
    try:
        _remove_stale_temp_files(out_dir)
        source_sha = {key: sha256_file(p) for key, p in sources.items()}
        manifest = _prepare_tokenizer(out_dir, settings, sources, source_sha, overwrite, progress)
        jobs = [_DomainJob(domain=d, out_dir=str(out_dir), text_field=text_field,
                           sources={s: str(sources[d, s].resolve()) for s in SPLITS},
                           source_sha={s: source_sha[d, s] for s in SPLITS},
                           show_progress=progress and workers == 1)
                for d in domains if not _domain_is_current(out_dir, manifest, d, sources, source_sha)]
        stale = [key for key in manifest["datasets"] if key.split("/")[0] in {j.domain for j in jobs}]
        if stale:  # the manifest only ever lists datasets that are current and complete
            for key in stale:
                del manifest["datasets"][key]
            _write_manifest(out_dir, manifest)
        for result in _run_jobs(jobs, workers, progress):
            _record_domain(out_dir, manifest, result)
        return manifest
    finally:
        lock.release()




def encode_text(data_dir: str | os.PathLike, text: str) -> list[int]:
    """Token ids (fairseq = sentencepiece ids) of ``text``, without eos."""
    return _encode(_load_tokenizer(data_dir).sp, text)


def decode_ids(data_dir: str | os.PathLike, ids) -> str:
    """The text of token ids; bos/pad/eos are dropped, so a dataset item decodes to its document."""
    tok = _load_tokenizer(data_dir)
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < tok.size]
    if bad:
        raise BtmError(f"token id {bad[0]} is outside the vocabulary of {data_dir} (size {tok.size})")
    return tok.sp.decode([i for i in ids if i not in (BOS_ID, PAD_ID, EOS_ID)])


def load_dictionary(data_dir: str | os.PathLike):
    """The shared fairseq ``Dictionary`` of a prepared data directory."""
    return _load_tokenizer(data_dir).dictionary


# --------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class _Tokenizer:
    sp: Any
    dictionary: Any
    size: int


def _load_tokenizer(data_dir: str | os.PathLike) -> _Tokenizer:
    data_dir = Path(data_dir).resolve()
    model, dict_txt = data_dir / "spm.model", data_dir / "dict.txt"
    if not model.is_file() or not dict_txt.is_file():
        raise BtmError(f"{data_dir} has no spm.model/dict.txt: run 'btm data prepare' first")
    # Keyed by modification times so a rebuilt data dir is reloaded, not served stale.
    return _load_tokenizer_cached(str(data_dir), model.stat().st_mtime_ns, dict_txt.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(data_dir: str, _model_mtime: int, _dict_mtime: int) -> _Tokenizer:
    import sentencepiece as spm
    from fairseq.data import Dictionary

    sp = spm.SentencePieceProcessor(model_file=str(Path(data_dir) / "spm.model"))
    dictionary = Dictionary.load(str(Path(data_dir) / "dict.txt"))
    if len(dictionary) != sp.get_piece_size():
        raise BtmError(f"{data_dir}: dict.txt has {len(dictionary)} symbols but spm.model has "
                       f"{sp.get_piece_size()} pieces; re-run 'btm data prepare --overwrite'")
    return _Tokenizer(sp=sp, dictionary=dictionary, size=len(dictionary))


def _encode(sp, text: str) -> list[int]:
    if _SPACE_MARK not in text:
        return sp.encode(text)
    # sentencepiece would decode a literal "▁" as a space; carry it as its UTF-8 byte pieces.
    mark = [sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
    ids: list[int] = []
    for i, part in enumerate(text.split(_SPACE_MARK)):
        if i:
            ids.extend(mark)
        if part:
            ids.extend(sp.encode(part))
    return ids


def _tokenizer_key(settings: TokenizerSettings, source_sha: dict) -> dict:
    """What the tokenizer was built from; a re-run must match it to reuse spm.model/dict.txt."""
    return {"settings": settings.as_dict(),
            "train_sources_sha256": {d: source_sha[d, "train"] for d in settings.train_domains}}


def _prepare_tokenizer(out_dir: Path, settings: TokenizerSettings, sources: dict, source_sha: dict,
                       overwrite: bool, progress: bool) -> dict:
    """Reuse the recorded tokenizer if it matches, else train one; returns the manifest."""
    key = _tokenizer_key(settings, source_sha)
    old = _read_manifest_if_any(out_dir)
    if old is not None and old.get("tokenizer") != key:
        if not overwrite:
            raise BtmError(_describe_mismatch(out_dir, old.get("tokenizer") or {}, key))
        _remove_outputs(out_dir, old)
        old = None
    if old is not None and _tokenizer_files_match(out_dir, old):
        return old
    if old is not None:  # recorded but the files changed or vanished: rebuild everything
        _remove_outputs(out_dir, old)

    sample, chars_per_domain = _tokenizer_sample(settings, sources, progress)
    sample, rare_dropped = _drop_rare_characters(sample, settings.vocab_size)
    from tqdm import tqdm

    with tqdm(total=1, desc=f"train tokenizer ({len(sample)} lines)", unit="model", disable=not progress) as bar:
        model_bytes = _train_spm(sample, settings, chars_per_domain)
        bar.update()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    counts = _piece_counts(sp, sample)
    atomic_write_bytes(out_dir / "spm.model", model_bytes)
    atomic_write_text(out_dir / "spm.vocab", "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())))
    atomic_write_text(out_dir / "dict.txt", "".join(
        f"{sp.id_to_piece(i)} {counts[i]}\n" for i in range(N_SPECIAL, sp.get_piece_size())))
    _check_dictionary_matches(out_dir, sp)

    manifest = {
        "format_version": FORMAT_VERSION,
        "domains": [],
        "train_domains": list(settings.train_domains),
        "splits": list(SPLITS),
        "vocab_size": sp.get_piece_size(),
        "spm_model_sha256": sha256_file(out_dir / "spm.model"),
        "dict_sha256": sha256_file(out_dir / "dict.txt"),
        "tokenizer": key,
        "tokenizer_sample_chars": chars_per_domain,
        "rare_characters_cut_from_sample": rare_dropped,
        "settings": {**settings.as_dict(), "special_ids": {"bos": BOS_ID, "pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID},
                     "dataset_impl": "mmap", "item": "document token ids + eos",
                     "tokens_count": "including the eos of every document"},
        "data_hash": {},
        "datasets": {},
    }
    _write_manifest(out_dir, manifest)
    return manifest


def _tokenizer_sample(settings: TokenizerSettings, sources: dict, progress: bool) -> tuple[list[str], dict]:
    """Equal characters from every training domain: randomly chosen documents, cut into lines.

    Each domain's documents get a seeded random priority; the lowest-priority documents holding
    ``sample_chars`` characters are kept while streaming (so memory is bounded by the sample,
    not the domain). Every domain then contributes the same number of characters: the cap, or
    the smallest domain's whole text when that is smaller.
    """
    from tqdm import tqdm

    chosen = {}
    for d in tqdm(settings.train_domains, desc="read tokenizer sample", unit="domain", disable=not progress):
        chosen[d] = _choose_documents(sources[d, "train"], settings.text_field,
                                      random.Random(f"{settings.seed}:{d}"), settings.sample_chars)
    available = {d: sum(len(line) for doc in docs for line in doc.splitlines()) for d, docs in chosen.items()}
    quota = min(settings.sample_chars, *available.values())
    if quota == 0:
        empty = min(available, key=available.get)
        raise BtmError(f"training domain {empty!r} has no text in {sources[empty, 'train']}")
    sample: list[str] = []
    for d in settings.train_domains:
        left = quota
        for doc in chosen[d]:
            # splitlines: no line break of any kind reaches a learned piece (see module doc).
            for line in doc.splitlines():
                line = line[:left]
                for start in range(0, len(line), _MAX_LINE_CHARS):
                    sample.append(line[start:start + _MAX_LINE_CHARS])
                left -= len(line)
                if left <= 0:
                    break
            if left <= 0:
                break
    return sample, {d: quota for d in settings.train_domains}


def _choose_documents(path, text_field: str, rng: random.Random, chars: int) -> list[str]:
    """A uniformly random set of documents holding at least ``chars`` characters (all of them
    if the file has fewer), in random order, read in one streaming pass."""
    import heapq

    heap: list[tuple[float, int, str]] = []  # (-priority, index, doc): the worst kept doc on top
    total = 0
    for i, doc in enumerate(iter_documents(path, text_field)):
        priority = rng.random()
        if total >= chars and priority >= -heap[0][0]:
            continue
        heapq.heappush(heap, (-priority, i, doc))
        total += len(doc)
        while total - len(heap[0][2]) >= chars:  # still enough without the worst one
            total -= len(heapq.heappop(heap)[2])
    return [doc for _, _, doc in sorted(heap, reverse=True)]


def _drop_rare_characters(sample: list[str], vocab_size: int) -> tuple[list[str], int]:
    """Cut the sample's rarest characters out when they would crowd out the vocabulary.

    sentencepiece gives every character within the character coverage its own piece and fails
    when they outnumber the vocabulary (a sample with CJK text or a symbol table has thousands;
    its coverage cannot go below 0.98). Characters may take at most half of the pieces left
    after the specials and the 256 byte pieces: lines are split at the rarer characters, which
    then never get a piece and are written with byte pieces (losslessly) when encoding.
    Returns the new sample and how many distinct characters were cut.
    """
    import re
    from collections import Counter

    counts = Counter()
    for line in sample:
        counts.update(line)
    budget = max(1, (vocab_size - N_SPECIAL - 256) // 2)
    if len(counts) <= budget:
        return sample, 0
    ranked = sorted(counts, key=lambda ch: (-counts[ch], ch))
    rare = re.compile("[" + "".join(re.escape(ch) for ch in sorted(ranked[budget:])) + "]+")
    kept = [part for line in sample for part in rare.split(line) if part]
    return kept, len(ranked) - budget


def _train_spm(sample: list[str], settings: TokenizerSettings, chars_per_domain: dict) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model, model_type="bpe",
            vocab_size=settings.vocab_size, byte_fallback=True, character_coverage=settings.character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            bos_id=BOS_ID, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            # Determinism: use every sentence, in order, on one thread.
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
            max_sentence_length=4 * _MAX_LINE_CHARS, minloglevel=2)
    except RuntimeError as e:
        total = sum(chars_per_domain.values())
        raise BtmError(f"sentencepiece could not train vocab_size={settings.vocab_size} on {total} sampled "
                       f"characters of {', '.join(settings.train_domains)}: {e} (lower --vocab-size or "
                       "give more text)") from e
    return model.getvalue()


def _piece_counts(sp, sample: list[str]) -> list[int]:
    """How often each piece occurs in the tokenizer sample (informative counts for dict.txt)."""
    import numpy as np

    counts = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for ids in sp.encode(sample):
        np.add.at(counts, ids, 1)
    return counts.tolist()


def _check_dictionary_matches(out_dir: Path, sp) -> None:
    from fairseq.data import Dictionary

    d = Dictionary.load(str(out_dir / "dict.txt"))
    for i in range(sp.get_piece_size()):
        if d[i] != sp.id_to_piece(i):
            raise BtmError(f"internal: {out_dir / 'dict.txt'} symbol {i} is {d[i]!r} but spm piece {i} "
                           f"is {sp.id_to_piece(i)!r}")
    if len(d) != sp.get_piece_size():
        raise BtmError(f"internal: {out_dir / 'dict.txt'} has {len(d)} symbols, spm {sp.get_piece_size()}")


def _tokenizer_files_match(out_dir: Path, manifest: dict) -> bool:
    try:
        return (sha256_file(out_dir / "spm.model") == manifest["spm_model_sha256"]
                and sha256_file(out_dir / "dict.txt") == manifest["dict_sha256"])
    except (OSError, KeyError):
        return False


def _describe_mismatch(out_dir: Path, old: dict, new: dict) -> str:
    diffs = []
    for k, v in new.get("settings", {}).items():
        if old.get("settings", {}).get(k) != v:
            diffs.append(f"{k}: {old.get('settings', {}).get(k)!r} -> {v!r}")
    for d, sha in new.get("train_sources_sha256", {}).items():
        if old.get("train_sources_sha256", {}).get(d) != sha:
            diffs.append(f"train split of {d!r} changed")
    what = "; ".join(diffs) or "tokenizer inputs changed"
    return (f"{out_dir} was prepared with a different tokenizer ({what}); its data may already be "
            "used by trained models. Use a new output directory, or pass --overwrite to rebuild it")


# --------------------------------------------------------------------------------------------
# Binarizing one domain (runs in a worker process)


@dataclass
class _DomainJob:
    domain: str
    out_dir: str
    text_field: str
    sources: dict
    source_sha: dict
    show_progress: bool = False


def _binarize_domain(job: _DomainJob) -> dict:
    """Read, encode and write every split of one domain; returns what the manifest records.

    All splits are built under temp names and renamed only when every one is complete: all the
    .bin files first, then all the .idx files (ExitStack unwinds in reverse order of entry).
    Old .idx files are removed before any rename, so a crash between the renames leaves a .bin
    without an .idx (an error on load, and not in the manifest, so rebuilt), never a new .bin
    read through an old .idx.
    """
    import sentencepiece as spm

    quiet_third_party_logging()  # a fresh worker process imports fairseq below
    out_dir = Path(job.out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "spm.model"))
    prefixes = {s: out_dir / job.domain / s for s in SPLITS}
    results = {}
    with contextlib.ExitStack() as stack:
        tmp_idx = {s: stack.enter_context(atomic_path(f"{prefixes[s]}.idx")) for s in SPLITS}
        tmp_bin = {s: stack.enter_context(atomic_path(f"{prefixes[s]}.bin")) for s in SPLITS}
        for split in SPLITS:
            # Documents stream from the file into the temp dataset; bad input raises here and
            # the temp files are removed, so nothing of this domain is written.
            docs = iter_documents(job.sources[split], job.text_field)
            results[split] = _build_split(sp, docs, tmp_bin[split], tmp_idx[split], job, split)
            results[split].update(source=job.sources[split], source_sha256=job.source_sha[split])
        # A copy of the shared dictionary next to the splits, so stock fairseq tools
        # (fairseq-train/fairseq-eval-lm DATA/<domain>) read a domain directory as it is.
        atomic_write_bytes(out_dir / job.domain / "dict.txt", (out_dir / "dict.txt").read_bytes())
        for split in SPLITS:
            Path(f"{prefixes[split]}.idx").unlink(missing_ok=True)
    return {"domain": job.domain, "splits": results}


def _build_split(sp, docs, tmp_bin: Path, tmp_idx: Path, job: _DomainJob, split: str) -> dict:
    """Write one mmap indexed dataset: item i = the ids of document i followed by eos."""
    import numpy as np
    import torch
    from fairseq.data import indexed_dataset
    from tqdm import tqdm

    tokens = documents = 0
    builder = indexed_dataset.make_builder(str(tmp_bin), impl="mmap", vocab_size=sp.get_piece_size())
    for doc in tqdm(docs, desc=f"{job.domain}/{split}", unit="doc", leave=False, disable=not job.show_progress):
        ids = _encode(sp, doc)
        ids.append(EOS_ID)
        builder.add_item(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
        tokens += len(ids)
        documents += 1
    builder.finalize(str(tmp_idx))
    return {"documents": documents, "tokens": tokens, "bin_sha256": sha256_file(tmp_bin),
            "idx_sha256": sha256_file(tmp_idx), "data_hash": _data_hash(tmp_bin, tmp_idx)}


def _data_hash(bin_path: Path, idx_path: Path) -> str:
    """sha256 of the .bin bytes followed by the .idx bytes: the identity of one dataset."""
    h = hashlib.sha256()
    for p in (bin_path, idx_path):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _run_jobs(jobs: list[_DomainJob], workers: int, progress: bool):
    """Yield each domain's result as it finishes; the first failure stops the rest."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="binarize domains", unit="domain", disable=not progress or not jobs)
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                yield _binarize_domain(job)
                bar.update()
            return
        import multiprocessing

        # Not "fork": the caller may hold torch/OpenMP threads (a training test, a notebook),
        # and a forked child that touches their locks can hang. A fresh worker costs one import.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                 mp_context=multiprocessing.get_context(method)) as pool:
            futures = [pool.submit(_binarize_domain, job) for job in jobs]
            try:
                for fut in as_completed(futures):
                    yield fut.result()
                    bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# Manifest


def _read_manifest_if_any(out_dir: Path) -> dict | None:
    if not (out_dir / MANIFEST).exists():
        return None
    return read_data_manifest(out_dir)


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    write_data_manifest(out_dir, manifest)


def _record_domain(out_dir: Path, manifest: dict, result: dict) -> None:
    for split, info in result["splits"].items():
        manifest["datasets"][f"{result['domain']}/{split}"] = info
    _write_manifest(out_dir, manifest)


def _domain_is_current(out_dir: Path, manifest: dict, domain: str, sources: dict, source_sha: dict) -> bool:
    """Recorded from the same input bytes and text field, and its files still hash as recorded."""
    try:
        if sha256_file(out_dir / domain / "dict.txt") != manifest["dict_sha256"]:
            return False
    except OSError:
        return False
    for split in SPLITS:
        info = manifest["datasets"].get(f"{domain}/{split}")
        if info is None or info.get("source_sha256") != source_sha[domain, split]:
            return False
        prefix = out_dir / domain / split
        try:
            if (sha256_file(prefix.with_suffix(".bin")) != info["bin_sha256"]
                    or sha256_file(prefix.with_suffix(".idx")) != info["idx_sha256"]):
                return False
        except OSError:
            return False
    return True


def _remove_outputs(out_dir: Path, manifest: dict) -> None:
    """Delete the files a previous prepare wrote (and only those), manifest last."""
    for key in manifest.get("datasets", {}):
        domain, split = key.split("/")
        validate_name(domain, "domain name in manifest")
        for name in (f"{split}.bin", f"{split}.idx", "dict.txt"):
            (out_dir / domain / name).unlink(missing_ok=True)
    for name in ("spm.model", "spm.vocab", "dict.txt", "tokens.csv", MANIFEST):
        (out_dir / name).unlink(missing_ok=True)


def _remove_stale_temp_files(out_dir: Path) -> None:
    """Temp files of a killed run (atomic writes name them ``.<target>.<random>.tmp``)."""
    for d in [out_dir, *[p for p in out_dir.iterdir() if p.is_dir()]]:
        for p in d.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def _check_domains(selected, available: list[str], corpus_dir: Path, option: str) -> list[str]:
    if isinstance(selected, str):
        selected = [s for s in selected.split(",") if s]
    selected = list(selected)
    if not selected:
        raise BtmError(f"{option} is empty: name at least one domain")
    for d in selected:
        validate_name(d, f"domain name in {option}")
        if d not in available:
            raise BtmError(f"{option}: domain {d!r} not found (choose from {', '.join(available)} "
                           f"in {corpus_dir})")
    if len(set(selected)) != len(selected):
        raise BtmError(f"{option} names a domain twice: {', '.join(selected)}")
    return sorted(selected)


def _check_positive(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BtmError(f"invalid {name} {value!r}: must be an integer >= {minimum}")
