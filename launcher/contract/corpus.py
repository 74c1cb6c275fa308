"""Reading a multi-domain text corpus: ``CORPUS/<domain>/{train,valid,test}.{jsonl,jsonl.gz,txt}``.

Pure Python (no fairseq, no torch). Every problem with the input is a ``BtmError`` that names
the file and, where it applies, the line and field, so the user can fix the corpus.

Formats:
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the document text in ``text_field``.
  Blank lines are ignored; an object whose text is ``""`` is skipped (an empty document has
  nothing to learn from). Any other string is kept byte for byte.
- ``.txt``: documents separated by one or more blank (empty or whitespace-only) lines; a
  document is its lines joined with ``"\\n"`` (so a .txt document cannot contain a blank line:
  use jsonl for that).

Every format is read as bytes split at ``\\n`` only: a UTF-8 byte-order mark at the start of
the file is dropped, a ``\\r`` before the ``\\n`` of a .txt line is dropped (CRLF files), and
no other character (``\\r`` alone, U+2028, ...) ends a line.

This is the one definition of a document: ``btm data prepare`` and c-BTM's clustering
(``fairseq_ext.cluster``) both read through it, so they see the same documents in the same
order. c-BTM also needs the corpus as a whole (``find_sources``: every split file, or a flat
``CORPUS/<split>.*`` with no domains) and stable document numbers (``iter_corpus``): a
document's *index* is its position among the documents of its file (blank lines and empty
texts take no number), and the *corpus order* is the sources in ``find_sources`` order
(domains sorted by name, then splits in the order asked for), each in file order.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from launcher.contract.errors import BtmError
from launcher.contract.names import validate_name

SPLITS = ("train", "valid", "test")
# Checked in this order; a split given in two formats is an error (which one would we use?).
FORMATS = (".jsonl", ".jsonl.gz", ".txt")
# Version of the document index defined above. c-BTM records it in a fitted model, whose
# fitting sample names documents by (source, index); 1 was c-BTM's own reader, which also
# numbered empty texts. A model numbered differently is refitted, not matched.
DOCUMENT_NUMBERING = 2


def list_domains(corpus_dir: str | os.PathLike) -> list[str]:
    """The domain subdirectories of ``corpus_dir``, sorted (names are checked when selected)."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise BtmError(f"corpus directory {corpus_dir} does not exist or is not a directory")
    domains = sorted(p.name for p in corpus_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise BtmError(f"corpus directory {corpus_dir} is empty: expected one subdirectory per "
                       "domain holding train/valid/test .jsonl, .jsonl.gz or .txt files")
    return domains


def find_split_file(corpus_dir: str | os.PathLike, domain: str, split: str) -> Path:
    """The one input file of ``domain``/``split``; errors if it is missing, doubled or empty."""
    domain_dir = Path(corpus_dir) / domain
    found = _split_file_if_any(domain_dir, split, f"domain {domain!r}")
    if found is None:
        names = ", ".join(f"{split}{ext}" for ext in FORMATS)
        raise BtmError(f"domain {domain!r} has no {split} split: expected one of {names} in {domain_dir}")
    if found.stat().st_size == 0:
        raise BtmError(f"{found} is empty: domain {domain!r} split {split!r} needs at least one document")
    return found


def _split_file_if_any(directory: Path, split: str, owner: str) -> Path | None:
    """``directory/<split>.<format>`` if there is one; BtmError if there are several."""
    found = [directory / f"{split}{ext}" for ext in FORMATS if (directory / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise BtmError(f"{owner} has its {split} split in several files "
                       f"({', '.join(str(p) for p in found)}): keep exactly one")
    return found[0] if found else None


@dataclass(frozen=True)
class Source:
    """One split file of a corpus: the documents of one split of one domain."""

    domain: str | None  # None in a flat corpus (no domain labels)
    split: str
    path: Path

    @property
    def key(self) -> str:
        """Stable name of the source, independent of where the corpus lives."""
        return f"{self.domain}/{self.split}" if self.domain is not None else self.split


def find_sources(corpus_dir: str | os.PathLike, splits: Sequence[str] = SPLITS,
                 domains: Sequence[str] | None = None) -> list[Source]:
    """Every split file of a corpus, in corpus order (see the module docstring).

    ``CORPUS/<domain>/<split>.*`` (``domains`` selects some; default all, as ``list_domains``),
    or a flat ``CORPUS/<split>.*`` whose sources have no domain. A split missing from a domain
    is left out (data prep, which needs all three, checks with ``find_split_file``)."""
    corpus = Path(corpus_dir)
    if not corpus.is_dir():
        raise BtmError(f"corpus directory {corpus} does not exist or is not a directory")
    for split in splits:
        if split not in SPLITS:
            raise BtmError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    flat = {s: _split_file_if_any(corpus, s, f"corpus {corpus}") for s in SPLITS}
    if any(flat.values()):
        if domains:
            raise BtmError(f"{corpus} is a flat corpus (split files at its top level); it has "
                           f"no domains to select with {list(domains)}")
        return [Source(None, s, flat[s]) for s in splits if flat[s] is not None]
    available = list_domains(corpus)
    missing = [d for d in domains or () if d not in available]
    if missing:
        raise BtmError(f"domain(s) {missing} not found in {corpus} (it has {available})")
    sources = []
    for domain in sorted(set(domains)) if domains else available:
        validate_name(domain, f"domain directory name in {corpus}")
        for split in splits:
            path = _split_file_if_any(corpus / domain, split, f"domain {domain!r}")
            if path is not None:
                sources.append(Source(domain, split, path))
    if not sources:
        raise BtmError(f"no {'/'.join(splits)} files ({', '.join(FORMATS)}) found in {corpus} "
                       "or its domain subdirectories")
    return sources


def _utf8_lines(path: Path, start: int = 0, end: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (where: ``path:line``, decoded line including its newline) of the bytes
    ``[start, end)`` (``start`` must be a line start: ``shard_ranges`` gives such ranges)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    if opener is gzip.open and end is not None:
        if start or end < path.stat().st_size:
            raise BtmError(f"{path}: a compressed file is read whole, not by byte range [{start}, {end})")
        end = None  # the whole file, as shard_ranges gives it (compressed size)
    label = f"{path}:" if not start else f"{path} (shard from byte {start}), line "
    try:
        with opener(path, "rb") as f:
            f.seek(start)
            pos = start
            for lineno, raw in enumerate(f, 1):
                if end is not None and pos >= end:
                    return
                if pos == 0 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark is not part of the text
                    pos += 3
                pos += len(raw)
                try:
                    yield f"{label}{lineno}", raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BtmError(f"{label}{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                   f"column {e.start + 1}); convert the file to UTF-8") from None
    except (OSError, EOFError, zlib.error) as e:
        raise BtmError(f"could not read {path}: {e}") from e


def shard_ranges(path: str | os.PathLike, shard_bytes: int) -> list[tuple[int, int]]:
    """Cut one split file into byte ranges of about ``shard_bytes`` that start at a document
    boundary, so the documents of the ranges, in order, are the documents of the file.

    A cut goes at the first line start at or after each ``shard_bytes`` mark (.jsonl), or after
    the next blank line there (.txt, whose documents span lines). A compressed file cannot be
    cut (no seeking into a gzip stream): it is one range. Only the lines at the cuts are read."""
    path = Path(path)
    size = path.stat().st_size
    if path.name.endswith(".gz") or size <= shard_bytes:
        return [(0, size)]
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            cut = _boundary_at_or_after(f, start + shard_bytes, size, path.suffix == ".txt")
            ranges.append((start, cut))
            start = cut
    return ranges


def _boundary_at_or_after(f, offset: int, size: int, txt: bool) -> int:
    if offset >= size:
        return size
    f.seek(offset - 1)
    f.readline()  # the rest of the line holding byte offset-1: we are at a line start >= offset
    while txt:  # a .txt document ends at a blank line: cut after one (bytes-blank is str-blank)
        line = f.readline()
        if not line:
            return size
        if not line.strip():
            break
    return min(f.tell(), size)


def iter_documents(path: str | os.PathLike, text_field: str = "text",
                   byte_range: tuple[int, int] | None = None) -> Iterator[str]:
    """The documents of one split file, in file order, validated as they are read (streaming:
    a split larger than memory is fine). Raises BtmError at the end if there were none.

    ``byte_range`` (from ``shard_ranges``) reads the documents of one shard of the file only;
    a shard may hold none (say, only blank lines)."""
    path = Path(path)
    start, end = byte_range or (0, None)
    count = 0
    for doc in _iter_txt(path, start, end) if path.suffix == ".txt" else _iter_jsonl(path, text_field, start, end):
        count += 1
        yield doc
    if count == 0 and byte_range is None:
        raise BtmError(f"{path} holds no documents (every line is blank or has empty "
                       f"{text_field!r})")


def read_documents(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """All documents of one split file, in file order, validated."""
    return list(iter_documents(path, text_field))


class Document(NamedTuple):
    source: int  # position of its source in the list given to iter_corpus
    index: int  # position among the documents of its source
    text: str


def count_documents(sources: Sequence[Source], text_field: str = "text") -> list[int]:
    """The number of documents of each source (one streaming pass)."""
    return [sum(1 for _ in iter_documents(s.path, text_field)) for s in sources]


def iter_corpus(sources: Sequence[Source], text_field: str = "text", *, start: int = 0,
                stop: int | None = None, counts: Sequence[int] | None = None) -> Iterator[Document]:
    """The documents of ``sources`` in corpus order, numbered within their source, streamed.

    ``start``/``stop`` keep the documents whose position in the whole sequence is in
    ``[start, stop)``; with ``counts`` (from ``count_documents``) a source wholly outside that
    range is not read at all, which is what lets a shard of a large corpus skip to its slice."""
    first = 0  # corpus position of the current source's first document
    for sid, source in enumerate(sources):
        if stop is not None and first >= stop:
            return
        if counts is not None and first + counts[sid] <= start:
            first += counts[sid]
            continue
        index = -1
        for index, text in enumerate(iter_documents(source.path, text_field)):
            if stop is not None and first + index >= stop:
                return
            if first + index >= start:
                yield Document(sid, index, text)
        first += index + 1


def _iter_jsonl(path: Path, text_field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    for where, line in _utf8_lines(path, start, end):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BtmError(f"{where}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise BtmError(f"{where}: expected a JSON object with field {text_field!r}, "
                           f"got {type(obj).__name__}")
        if text_field not in obj:
            keys = ", ".join(map(repr, sorted(obj))) or "none"
            raise BtmError(f"{where}: missing text field {text_field!r} (fields: {keys}); "
                           "choose the field with --text-field")
        text = obj[text_field]
        if not isinstance(text, str):
            raise BtmError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
        if text:
            yield text


def _iter_txt(path: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
    yield from txt_documents(line for _, line in _utf8_lines(path, start, end))


def txt_documents(lines) -> Iterator[str]:
    """Documents of a .txt corpus file: runs of non-blank lines, joined with "\n"."""
    buf: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip():
            buf.append(line)
        elif buf:
            yield "\n".join(buf)
            buf = []
    if buf:
        yield "\n".join(buf)
