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
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Iterator

from launcher.contract.errors import BtmError

SPLITS = ("train", "valid", "test")
# Checked in this order; a split given in two formats is an error (which one would we use?).
FORMATS = (".jsonl", ".jsonl.gz", ".txt")


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
    found = [domain_dir / f"{split}{ext}" for ext in FORMATS if (domain_dir / f"{split}{ext}").is_file()]
    if not found:
        names = ", ".join(f"{split}{ext}" for ext in FORMATS)
        raise BtmError(f"domain {domain!r} has no {split} split: expected one of {names} in {domain_dir}")
    if len(found) > 1:
        raise BtmError(f"domain {domain!r} has its {split} split in several files "
                       f"({', '.join(str(p) for p in found)}): keep exactly one")
    if found[0].stat().st_size == 0:
        raise BtmError(f"{found[0]} is empty: domain {domain!r} split {split!r} needs at least one document")
    return found[0]


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line including its newline)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark is not part of the text
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BtmError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                   f"column {e.start + 1}); convert the file to UTF-8") from None
    except (OSError, EOFError, zlib.error) as e:
        raise BtmError(f"could not read {path}: {e}") from e


def iter_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """The documents of one split file, in file order, validated as they are read (streaming:
    a split larger than memory is fine). Raises BtmError at the end if there were none."""
    path = Path(path)
    count = 0
    for doc in _iter_txt(path) if path.suffix == ".txt" else _iter_jsonl(path, text_field):
        count += 1
        yield doc
    if count == 0:
        raise BtmError(f"{path} holds no documents (every line is blank or has empty "
                       f"{text_field!r})")


def read_documents(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """All documents of one split file, in file order, validated."""
    return list(iter_documents(path, text_field))


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BtmError(f"{path}:{lineno}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise BtmError(f"{path}:{lineno}: expected a JSON object with field {text_field!r}, "
                           f"got {type(obj).__name__}")
        if text_field not in obj:
            keys = ", ".join(map(repr, sorted(obj))) or "none"
            raise BtmError(f"{path}:{lineno}: missing text field {text_field!r} (fields: {keys}); "
                           "choose the field with --text-field")
        text = obj[text_field]
        if not isinstance(text, str):
            raise BtmError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
        if text:
            yield text


def _iter_txt(path: Path) -> Iterator[str]:
    yield from txt_documents(line for _, line in _utf8_lines(path))


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
