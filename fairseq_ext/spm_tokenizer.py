"""The shared tokenizer of a prepared data directory: training it, loading it, encoding text.

Files (in ``DATA/``): ``spm.model``, ``spm.vocab`` and ``dict.txt`` (the fairseq Dictionary;
symbol i == sentencepiece piece i). ``fairseq_ext.data_prep`` decides when to train one and
records it in the manifest; ``fairseq_ext.encoders`` loads it (the encoder of a data dir).

Tokenizer choices (why): sentencepiece BPE with byte fallback, identity normalization, no
whitespace squashing and no dummy prefix, so ``decode(encode(text)) == text`` for any
Unicode string. The sample is fed line by line, so ``\\n`` and the other line breaks never
enter a learned piece: they are encoded by their byte pieces (``<0x0A>``), which keeps
``dict.txt`` (one symbol per line) well formed. Runs of spaces become ``▁▁▁▁`` pieces; tabs are
ordinary characters. The one character sentencepiece cannot carry literally is U+2581 ``▁``
(its own space marker), so :func:`encode_with` writes it as its three byte pieces.

The sentencepiece ids are laid out as fairseq expects (bos=0, pad=1, eos=2, unk=3), so a
sentencepiece id *is* the fairseq id and ``dict.txt`` lists the remaining pieces in id order.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.contract.atomic import atomic_write_bytes, atomic_write_text
from launcher.contract.corpus import iter_documents
from launcher.contract.errors import BtmError

# fairseq's Dictionary() reserves these ids; sentencepiece is trained to use the same ones.
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
N_SPECIAL = 4
# sentencepiece skips training sentences longer than max_sentence_length bytes; we cut lines
# into chunks of this many characters instead (4 bytes per character at most).
_MAX_LINE_CHARS = 4096
SPACE_MARK = "\u2581"  # sentencepiece's whitespace symbol "▁"


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


def encode_with(sp, text: str) -> list[int]:
    """Token ids of ``text`` with a loaded SentencePieceProcessor (see the module docstring)."""
    if SPACE_MARK not in text:
        return sp.encode(text)
    # sentencepiece would decode a literal "▁" as a space; carry it as its UTF-8 byte pieces.
    mark = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode("utf-8")]
    ids: list[int] = []
    for i, part in enumerate(text.split(SPACE_MARK)):
        if i:
            ids.extend(mark)
        if part:
            ids.extend(sp.encode(part))
    return ids


# Encoding a long document in pieces of about this many characters bounds the memory of
# sentencepiece (and is faster: 2.2 s for 2M characters in 64K pieces, 3.9 s in 1M pieces) and
# of the id lists.
ENCODE_CHUNK_CHARS = 1 << 16


def text_chunks(text: str, max_chars: int = ENCODE_CHUNK_CHARS):
    """Cut ``text`` into pieces whose ``encode_with`` ids, concatenated, are the ids of ``text``.

    A cut goes just before a space that follows a non-space character: no piece of this
    tokenizer spans it (whitespace is split off, ``▁`` only begins a piece), so BPE merges on
    either side never meet. A stretch of ``max_chars`` with no such place stays whole."""
    start = 0
    while len(text) - start > max_chars:
        cut = text.rfind(" ", start + 1, start + max_chars + 1)
        while cut > start and text[cut - 1] == " ":
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:  # no place in the window: the next one after it
            cut = _next_cut(text, start + max_chars)
            if cut < 0:
                break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _next_cut(text: str, pos: int) -> int:
    while (pos := text.find(" ", pos)) > 0 and text[pos - 1] == " ":
        pos += 1
    return pos


def train_tokenizer(out_dir: Path, settings: TokenizerSettings, sources: dict, progress: bool) -> dict:
    """Train on a domain-balanced sample of ``sources[domain, "train"]`` and write spm.model,
    spm.vocab and dict.txt into ``out_dir``; returns what the manifest records about it."""
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
    return {"vocab_size": sp.get_piece_size(), "tokenizer_sample_chars": chars_per_domain,
            "rare_characters_cut_from_sample": rare_dropped}


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

