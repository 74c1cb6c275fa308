"""Streaming reader for a corpus directory, the layout ``btm data prepare`` reads.

``CORPUS/<domain>/<split>.{jsonl,jsonl.gz,txt}`` (the domain names are labels, used only to
report cluster purity), or a flat ``CORPUS/<split>.{...}`` with no labels. jsonl: one JSON
object per line, text in ``text_field``; txt: documents separated by blank lines.

A *source* is one (domain, split) file. Documents are numbered from 0 within their source, in
file order; the global order is sources sorted by (domain, split order), then document order.
Shards and the fitting sample are both defined on that order, so they are deterministic.
Documents whose text is empty or whitespace only are yielded like any other (the callers skip
them and count them), so numbering does not depend on content.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from launcher.contract.corpus import txt_documents
from launcher.contract.errors import BtmError
from launcher.contract.names import validate_name

SPLITS = ("train", "valid", "test")
EXTENSIONS = (".jsonl", ".jsonl.gz", ".txt")


@dataclass(frozen=True)
class Source:
    """One input file: the documents of one split of one domain."""

    domain: str | None  # None for a flat corpus (no labels)
    split: str
    path: Path

    @property
    def key(self) -> str:
        """Stable name of the source, independent of where the corpus lives."""
        return f"{self.domain}/{self.split}" if self.domain is not None else self.split


def _split_file(directory: Path, split: str) -> Path | None:
    found = [directory / f"{split}{ext}" for ext in EXTENSIONS if (directory / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise BtmError(f"{directory}: more than one file for split {split!r} "
                       f"({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def find_sources(corpus_dir: str | Path, splits: Sequence[str] = SPLITS,
                 domains: Sequence[str] | None = None) -> list[Source]:
    """All (domain, split) files of a corpus, in the global document order."""
    corpus = Path(corpus_dir)
    if not corpus.is_dir():
        raise BtmError(f"corpus directory {corpus} does not exist")
    for split in splits:
        if split not in SPLITS:
            raise BtmError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    flat = [s for s in SPLITS if _split_file(corpus, s) is not None]
    if flat:
        if domains:
            raise BtmError(f"{corpus} is a flat corpus (split files at its top level); it has "
                           f"no domains to select with {list(domains)}")
        return [Source(None, s, _split_file(corpus, s)) for s in splits if _split_file(corpus, s)]
    available = sorted(p.name for p in corpus.iterdir()
                       if p.is_dir() and not p.name.startswith((".", "_")))
    if domains:
        missing = [d for d in domains if d not in available]
        if missing:
            raise BtmError(f"domain(s) {missing} not found in {corpus} (it has {available})")
        chosen = sorted(set(domains))
    else:
        chosen = available
    sources = []
    for domain in chosen:
        validate_name(domain, "domain directory name")
        for split in splits:
            path = _split_file(corpus / domain, split)
            if path is not None:
                sources.append(Source(domain, split, path))
    if not sources:
        raise BtmError(f"no {'/'.join(splits)} files ({'/'.join(EXTENSIONS)}) found in {corpus} "
                       "or its domain subdirectories")
    return sources


def iter_documents(source: Source, text_field: str = "text") -> Iterator[str]:
    """The texts of one source, in file order (empty documents included)."""
    path = source.path
    opener = gzip.open if path.name.endswith(".gz") else open
    try:  # utf-8-sig: a byte-order mark is not part of the text (as launcher.contract.corpus)
        with opener(path, "rt", encoding="utf-8-sig") as f:
            if path.name.endswith(".txt"):
                yield from txt_documents(f)
                return
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BtmError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise BtmError(f"{path}:{line_no}: expected a JSON object with a string "
                                   f"field {text_field!r}")
                yield obj[text_field]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise BtmError(f"could not read {path}: {e}") from e


def is_empty(text: str) -> bool:
    return not text.strip()


def count_documents(sources: Sequence[Source], text_field: str = "text") -> list[int]:
    """Number of documents (empty ones included) in each source: one streaming pass."""
    return [sum(1 for _ in iter_documents(s, text_field)) for s in sources]
