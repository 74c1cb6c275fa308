"""The seam between the packages (docs/architecture.md, "Packages and who may import whom").

Every module of every package is walked from the source tree (no hand-written list), and every
import counts, function-level imports included:

- ``launcher.contract`` imports nothing else of btm;
- ``fairseq_ext`` and ``analysis`` import only ``launcher.contract`` from the launcher, and not
  each other;
- ``launcher`` and ``analysis`` import torch, fairseq and fairseq_ext only inside functions;
- there are no import cycles between modules;
- ``launcher`` and ``analysis`` import with torch, fairseq and sentencepiece blocked.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("launcher", "fairseq_ext", "analysis")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imported_names(module: str, path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_pkg else module.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def _edges(module: str) -> set[str]:
    """The btm modules ``module`` imports (a name resolves to the longest module it names)."""
    out = set()
    for target in _imported_names(module, MODULES[module]):
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != module and not module.startswith(target + "."):
            out.add(target)
    return out


GRAPH = {m: _edges(m) for m in MODULES}


def _allowed(src: str, dst: str) -> bool:
    top_src, top_dst = src.split(".")[0], dst.split(".")[0]
    in_contract = lambda m: m == "launcher.contract" or m.startswith("launcher.contract.")  # noqa: E731
    if in_contract(src):
        return in_contract(dst)
    if top_src in ("fairseq_ext", "analysis"):
        return top_dst == top_src or in_contract(dst)
    return True  # the launcher may import everything (fairseq_ext only inside functions)


def test_the_walk_finds_every_package():
    assert {m.split(".")[0] for m in MODULES} == set(PACKAGES)
    assert "launcher.contract.methods" in MODULES and "fairseq_ext.train" in MODULES


def test_imports_go_the_allowed_directions():
    bad = sorted(f"{src} -> {dst}" for src, dsts in GRAPH.items() for dst in dsts if not _allowed(src, dst))
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles_even_through_function_level_imports():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_launcher_and_analysis_import_model_code_only_inside_functions():
    """Module-level imports of launcher/ and analysis/ never name torch, fairseq or fairseq_ext:
    the model side is imported where a stage or verb runs it."""
    heavy = ("torch", "fairseq", "fairseq_cli", "sentencepiece")
    bad = []
    for module, path in MODULES.items():
        if not module.startswith(("launcher", "analysis")):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{module}: {n}" for n in names if n.split(".")[0] in (*heavy, "fairseq_ext")]
    assert not bad, "\n".join(bad)


BLOCKER = textwrap.dedent("""
    import importlib, pkgutil, sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('fairseq', 'torch', 'sentencepiece', 'fairseq_cli'):
                raise ImportError('blocked for this test: ' + name)
    sys.meta_path.insert(0, Block())
    failed = []
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except Exception as e:
            failed.append(f"{name}: {type(e).__name__}: {e}")
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_launcher_and_analysis_import_with_torch_and_fairseq_blocked():
    names = [m for m in MODULES if m.startswith(("launcher", "analysis")) and not m.endswith("__main__")]
    proc = subprocess.run([sys.executable, "-c", BLOCKER, *names], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
