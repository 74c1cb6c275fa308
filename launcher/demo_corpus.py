"""A small multi-domain corpus built on any machine, offline, from what ships with Python.

``build_demo_corpus(out_dir, size=...)`` writes ``out_dir/<domain>/{train,valid,test}.jsonl``
(the layout ``btm data prepare`` reads) plus ``out_dir/demo_corpus.json`` describing it. No text
is stored in the repository: every domain is read from the running Python's standard library or
generated here. See docs/data.md for the domains and their licences.

Training domains (one expert each) and evaluation domains (never trained on):

- ``python_code``     stdlib Python source, docstrings removed
- ``docstrings``      stdlib docstrings (prose about code), with their qualified names
- ``bytecode``        ``dis`` listings of the stdlib's compiled functions
- ``arithmetic``      generated arithmetic worksheets
- ``unicode_table``   code point, character, name and category lines from ``unicodedata``
- ``reference_manual`` (eval) the Python reference manual topics in ``pydoc_data.topics``
- ``word_problems``   (eval) generated English word problems with their arithmetic

Deterministic for a given Python version (the stdlib and the Unicode database change between
versions): sources are sorted, every random choice comes from ``random.Random`` seeded with the
seed and the domain name, and documents are split ~90/5/5 after removing duplicates. Pure
standard library: no fairseq, no torch.
"""
from __future__ import annotations

import ast
import dis
import inspect
import json
import os
import platform
import random
import re
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from launcher.contract.atomic import atomic_write_json, atomic_write_text
from launcher.contract.errors import BtmError

DEFAULT_SIZE = 1_000_000  # characters per domain
DOC_CHARS = 4000  # longer sources are cut into documents of at most this many characters
SPLIT_FRACTIONS = {"valid": 0.05, "test": 0.05}  # the rest is train
# Parts of the stdlib directory that are not the stdlib proper or differ between installs.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo",
              "__pycache__", "lib-dynload", "ensurepip", "__phello__"}


@dataclass(frozen=True)
class DemoDomain:
    name: str
    role: str  # "train" or "eval"
    source: str
    license: str
    build: Callable[[int, random.Random], Iterator[str]]  # (size, rng) -> documents


# ------------------------------------------------------------------------------------------
# Sources shipped with Python


def _stdlib_files(rng: random.Random) -> Iterator[tuple[str, str]]:
    """(relative path, source) of the stdlib's .py files, in a seeded order over sorted paths."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for f in sorted(filenames):
            # _sysconfigdata holds this machine's build paths: not the same on two machines
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                paths.append(Path(dirpath, f))
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    rng.shuffle(paths)
    for path in paths:
        try:
            yield path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def _parse(source: str, name: str) -> ast.Module | None:
    try:
        return ast.parse(source, filename=name)
    except (SyntaxError, ValueError):  # e.g. lib2to3 fixtures written in Python 2
        return None


def _docstring_nodes(tree: ast.Module) -> Iterator[tuple[str, ast.AST, ast.Expr]]:
    """(qualified name, owner, docstring expression) for the module, classes and functions."""
    def walk(node, prefix):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            yield prefix, node, body[0]
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, f"{prefix}.{child.name}")

    yield from walk(tree, "")


def python_code(size: int, rng: random.Random) -> Iterator[str]:
    for name, source in _stdlib_files(rng):
        tree = _parse(source, name)
        if tree is None:
            continue
        lines = source.splitlines()
        # Remove docstrings (they are the docstrings domain); an emptied body gets "...".
        for _, owner, expr in sorted(_docstring_nodes(tree), key=lambda t: -t[2].lineno):
            first, last = expr.lineno - 1, expr.end_lineno
            indent = lines[first][:expr.col_offset]
            if indent.strip():
                continue  # the docstring shares its line with other code: keep it
            keep = [f"{indent}..."] if len(owner.body) == 1 and not isinstance(owner, ast.Module) else []
            lines[first:last] = keep
        yield from _chunks(f"# {name}\n" + "\n".join(lines).strip("\n"), _doc_chars(size))


def docstrings(size: int, rng: random.Random) -> Iterator[str]:
    for name, source in _stdlib_files(rng):
        tree = _parse(source, name)
        if tree is None:
            continue
        module = name[:-3].replace("/", ".").removesuffix(".__init__")
        parts = [f"{module}{qual}\n\n{_clean_docstring(expr.value.value)}"
                 for qual, _, expr in _docstring_nodes(tree) if expr.value.value.strip()]
        if parts:
            yield from _chunks("\n\n\n".join(parts), _doc_chars(size))


def _clean_docstring(doc: str) -> str:
    return "\n".join(line.rstrip() for line in inspect.cleandoc(doc).splitlines()).strip()


_CODE_REPR = re.compile(r"<code object (\S+) at 0x[0-9a-f]+, file \"[^\"]*\", line (\d+)>")


def _stable_repr(value) -> str:
    """repr without memory addresses or hash-seed-dependent set order."""
    if isinstance(value, frozenset):
        return "frozenset({" + ", ".join(sorted(_stable_repr(v) for v in value)) + "})"
    if isinstance(value, tuple):
        inner = ", ".join(_stable_repr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if inspect.iscode(value):
        return f"<code object {value.co_name}, line {value.co_firstlineno}>"
    return _CODE_REPR.sub(r"<code object \1, line \2>", repr(value))


def _code_objects(code) -> Iterator:
    yield code
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _code_objects(const)


def bytecode(size: int, rng: random.Random) -> Iterator[str]:
    for name, source in _stdlib_files(rng):
        try:
            module_code = compile(source, name, "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            continue
        listings = []
        for code in _code_objects(module_code):
            rows = [f"disassembly of {name}:{code.co_qualname} (line {code.co_firstlineno})"
                    if hasattr(code, "co_qualname") else f"disassembly of {name}:{code.co_name}"]
            for ins in dis.get_instructions(code):
                arg = _stable_repr(ins.argval) if ins.opcode in dis.hasconst else ins.argrepr
                rows.append(f"{ins.offset:>6} {ins.opname:<24} {arg}".rstrip())
            listings.append("\n".join(rows))
        yield from _chunks("\n\n".join(listings), _doc_chars(size))


# Names the Unicode standard generates from the code point: thousands of near-identical lines.
_GENERATED_NAMES = ("CJK UNIFIED IDEOGRAPH-", "CJK COMPATIBILITY IDEOGRAPH-", "TANGUT IDEOGRAPH-",
                    "KHITAN SMALL SCRIPT CHARACTER-", "NUSHU CHARACTER-", "HANGUL SYLLABLE ",
                    "TANGUT COMPONENT-", "EGYPTIAN HIEROGLYPH-")


def unicode_table(size: int, rng: random.Random) -> Iterator[str]:
    rows = []
    for cp in range(0x110000):
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        category = unicodedata.category(ch)
        if not name or category[0] in "CZ" and category != "Zs" or name.startswith(_GENERATED_NAMES):
            continue
        extra = unicodedata.decomposition(ch)
        numeric = unicodedata.numeric(ch, None)
        row = f"U+{cp:04X}\t{ch}\t{name}\t{category}"
        if extra:
            row += f"\tdecomposition {extra}"
        if numeric is not None:
            row += f"\tnumeric {numeric:g}"
        rows.append(row)
    per_doc = max(4, _doc_chars(size) // 100)  # rows are ~40 characters
    blocks = ["\n".join(rows[i:i + per_doc]) for i in range(0, len(rows), per_doc)]
    rng.shuffle(blocks)
    yield from blocks


def reference_manual(size: int, rng: random.Random) -> Iterator[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    rng.shuffle(names)
    for name in names:
        yield from _chunks(f"{name}\n\n{topics[name].strip()}", _doc_chars(size))


# ------------------------------------------------------------------------------------------
# Generated domains


def arithmetic(size: int, rng: random.Random) -> Iterator[str]:
    while True:
        level = rng.choice(["add", "mixed", "long", "fractions"])
        lines = [f"Worksheet ({level})"]
        for _ in range(rng.randint(15, 40)):
            lines.append(_arithmetic_line(level, rng))
        yield "\n".join(lines)


def _arithmetic_line(level: str, rng: random.Random) -> str:
    r = rng.randint
    if level == "add":
        a, b = r(0, 999), r(0, 999)
        return f"{a} + {b} = {a + b}" if rng.random() < 0.5 else f"{a + b} - {b} = {a}"
    if level == "mixed":
        a, b, c = r(1, 99), r(1, 99), r(1, 12)
        expr, value = rng.choice([(f"({a} + {b}) * {c}", (a + b) * c), (f"{a} * {c} - {b}", a * c - b),
                                  (f"{a} + {b} * {c}", a + b * c), (f"({a} - {b}) * {c}", (a - b) * c)])
        return f"{expr} = {value}"
    if level == "long":
        a, b = r(100, 99999), r(2, 999)
        q, m = divmod(a, b)
        return f"{a} * {b} = {a * b}" if rng.random() < 0.5 else f"{a} / {b} = {q} remainder {m}"
    from fractions import Fraction

    x, y = Fraction(r(1, 9), r(2, 12)), Fraction(r(1, 9), r(2, 12))
    op = rng.choice("+-*")
    result = x + y if op == "+" else x - y if op == "-" else x * y
    return f"{x} {op} {y} = {result}"


_NAMES = ["Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi",
          "Liam", "Mei", "Noor", "Oscar", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Vera"]
_THINGS = ["apples", "marbles", "stamps", "books", "pencils", "shells", "coins", "stickers",
           "cookies", "cards", "tickets", "plants"]


def word_problems(size: int, rng: random.Random) -> Iterator[str]:
    while True:
        yield "\n\n".join(_word_problem(rng) for _ in range(rng.randint(3, 8)))


def _word_problem(rng: random.Random) -> str:
    a_name, b_name = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    x, y, z = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        y = min(y, x + z)
        return (f"{a_name} has {x} {thing}. {a_name} finds {z} more and gives {y} to {b_name}. "
                f"How many {thing} does {a_name} have now?\n{x} + {z} - {y} = {x + z - y}. "
                f"Answer: {x + z - y}.")
    if kind == 1:
        return (f"There are {z} boxes with {x} {thing} in each box. How many {thing} are there "
                f"in all?\n{z} * {x} = {z * x}. Answer: {z * x}.")
    if kind == 2:
        total = x * z
        return (f"{a_name} shares {total} {thing} equally among {z} friends. How many {thing} does "
                f"each friend get?\n{total} / {z} = {x}. Answer: {x}.")
    return (f"{a_name} has {x} {thing} and {b_name} has {y} {thing}. How many more {thing} does "
            f"the one with more have?\n{max(x, y)} - {min(x, y)} = {abs(x - y)}. "
            f"Answer: {abs(x - y)}.")


# ------------------------------------------------------------------------------------------

_PSF = "PSF-2.0 (Python Software Foundation License), read from the running Python"

DOMAINS: tuple[DemoDomain, ...] = (
    DemoDomain("python_code", "train", "stdlib *.py source (sysconfig stdlib dir), docstrings removed", _PSF, python_code),
    DemoDomain("docstrings", "train", "docstrings of stdlib modules, classes and functions (via ast)", _PSF, docstrings),
    DemoDomain("bytecode", "train", "dis.get_instructions listings of the compiled stdlib", _PSF, bytecode),
    DemoDomain("arithmetic", "train", "generated arithmetic worksheets", "generated by btm (project licence)", arithmetic),
    DemoDomain("unicode_table", "train", "unicodedata: code point, character, name, category",
               "Unicode License v3 (Unicode Character Database bundled with Python)", unicode_table),
    DemoDomain("reference_manual", "eval", "pydoc_data.topics: the Python reference manual topics",
               "PSF-2.0 (Python documentation), read from the running Python", reference_manual),
    DemoDomain("word_problems", "eval", "generated English arithmetic word problems",
               "generated by btm (project licence)", word_problems),
)
DEMO_TRAIN_DOMAINS = tuple(d.name for d in DOMAINS if d.role == "train")
DEMO_EVAL_DOMAINS = tuple(d.name for d in DOMAINS if d.role == "eval")


def build_demo_corpus(out_dir: str | os.PathLike, size: int = DEFAULT_SIZE, seed: int = 0) -> dict:
    """Write the demo corpus (about ``size`` characters per domain) and return its description."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 2000:
        raise BtmError(f"invalid demo corpus size {size!r}: give characters per domain, at least 2000")
    out_dir = Path(out_dir)
    described = {}
    for domain in DOMAINS:
        docs = _collect(domain.build(size, random.Random(f"{seed}:{domain.name}")), size)
        splits = _split(docs, random.Random(f"{seed}:{domain.name}:split"), domain.name)
        for split, split_docs in splits.items():
            atomic_write_text(out_dir / domain.name / f"{split}.jsonl", "".join(
                json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in split_docs))
        described[domain.name] = {
            "role": domain.role, "source": domain.source, "license": domain.license,
            "documents": {s: len(v) for s, v in splits.items()},
            "characters": sum(len(d) for d in docs)}
    description = {"size": size, "seed": seed, "python": platform.python_version(),
                   "unicodedata": unicodedata.unidata_version,
                   "train_domains": list(DEMO_TRAIN_DOMAINS), "eval_domains": list(DEMO_EVAL_DOMAINS),
                   "domains": described}
    atomic_write_json(out_dir / "demo_corpus.json", description)
    return description


def _collect(documents: Iterator[str], size: int) -> list[str]:
    """Distinct, non-blank documents until ``size`` characters (or the source runs out)."""
    seen, docs, total = set(), [], 0
    for doc in documents:
        if not doc.strip() or doc in seen:
            continue
        seen.add(doc)
        docs.append(doc)
        total += len(doc)
        if total >= size:
            break
    return docs


def _split(docs: list[str], rng: random.Random, domain: str) -> dict[str, list[str]]:
    if len(docs) < 3:
        raise BtmError(f"demo domain {domain!r} has only {len(docs)} documents: raise the size")
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_valid = max(1, round(len(docs) * SPLIT_FRACTIONS["valid"]))
    n_test = max(1, round(len(docs) * SPLIT_FRACTIONS["test"]))
    picked = {"test": order[:n_test], "valid": order[n_test:n_test + n_valid],
              "train": order[n_test + n_valid:]}
    # keep source order inside each split: neighbouring chunks of one file stay readable
    return {s: [docs[i] for i in sorted(picked[s])] for s in ("train", "valid", "test")}


def _doc_chars(size: int) -> int:
    """Document length cap: DOC_CHARS, smaller for tiny corpora so every split gets documents."""
    return max(200, min(DOC_CHARS, size // 40))


def _chunks(text: str, limit: int) -> Iterator[str]:
    """Cut ``text`` into documents of at most ``limit`` characters at paragraph/line boundaries."""
    current: list[str] = []
    length = 0
    for para in text.split("\n\n"):
        pieces = [para] if len(para) <= limit else _split_long(para, limit)
        for piece in pieces:
            if current and length + len(piece) + 2 > limit:
                yield "\n\n".join(current).strip("\n")
                current, length = [], 0
            current.append(piece)
            length += len(piece) + 2
    if current and "\n\n".join(current).strip():
        yield "\n\n".join(current).strip("\n")


def _split_long(para: str, limit: int) -> list[str]:
    out, current = [], ""
    for line in para.split("\n"):
        while len(line) > limit:
            out.append(line[:limit])
            line = line[limit:]
        if current and len(current) + len(line) + 1 > limit:
            out.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if current:
        out.append(current)
    return out
