"""The forest manifest ``RUN_DIR/forest.json``: which experts exist and where they came from.

A ``Forest`` is a list of ``Expert``s: id, name, training domains, parents with branch weights,
updates and tokens trained, checkpoint path (relative to the run directory) and its sha256,
and metrics. Experts can be added (incremental BTM) and removed without touching the others;
``verify`` re-hashes every checkpoint and names the ones that changed.

``verified_checkpoints`` is how every reader of a forest gets its experts (evaluation, export,
the lm-eval model): {name: checkpoint path}, refused if a checkpoint changed since the merge.
``expert_checkpoints`` also takes a plain directory of ``<name>.pt`` files (no manifest).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from launcher.contract.atomic import atomic_write_json, read_versioned_json, sha256_file
from launcher.contract.errors import BtmError, shown
from launcher.contract.layout import reserved_name_collision
from launcher.contract.names import validate_name

FOREST_FILE = "forest.json"
FORMAT_VERSION = 1


@dataclass
class Expert:
    id: int
    name: str
    domains: list[str]
    checkpoint: str  # relative to the run directory unless absolute
    sha256: str
    parents: dict[str, float] = field(default_factory=dict)  # parent name ("seed", an expert) -> branch weight
    updates: int = 0
    tokens: int = 0
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Expert":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        missing = {f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING} - set(d)
        if unknown or missing:
            raise BtmError(f"{where}: expert entry {shown(d.get('name'))}: "
                           + (f"unknown keys {sorted(unknown)} " if unknown else "")
                           + (f"missing keys {sorted(missing)}" if missing else ""))
        return cls(**d)


@dataclass
class Forest:
    run: str
    experts: list[Expert] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # experts the config wanted that did not finish
    path: Path | None = field(default=None, compare=False)

    # ---- queries -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def get(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        raise BtmError(f"no expert {name!r} in {self.path or FOREST_FILE}; experts: {', '.join(self.names()) or '(none)'}")

    def checkpoint_path(self, expert: Expert) -> Path:
        p = Path(expert.checkpoint)
        return p if p.is_absolute() or self.path is None else self.path.parent / p

    # ---- edits ---------------------------------------------------------------------------
    def add(self, name: str, domains: list[str], checkpoint: str | Path, *, parents: dict | None = None,
            updates: int = 0, tokens: int = 0, metrics: dict | None = None, sha256: str | None = None,
            replace: bool = False) -> Expert:
        validate_name(name, "expert name")
        reserved = reserved_name_collision(name)
        if reserved:
            raise BtmError(f"expert name {name!r} is reserved: it would collide with {reserved}; choose another name")
        for d in domains:
            validate_name(d, "domain")
        parents = _checked_parents(name, parents or {})
        for what, value in (("updates", updates), ("tokens", tokens)):
            if not isinstance(value, int) or value < 0:
                raise BtmError(f"expert {name!r}: {what} must be a whole number >= 0, got {shown(value)}")
        if name in self.names():
            if not replace:
                raise BtmError(f"expert {name!r} is already in {self.path or FOREST_FILE}; remove it first")
            self.experts = [e for e in self.experts if e.name != name]
        ckpt = Path(checkpoint)
        if self.path is not None and ckpt.is_absolute():
            try:
                ckpt = ckpt.resolve().relative_to(self.path.parent.resolve())
            except ValueError:
                pass
        full = ckpt if ckpt.is_absolute() or self.path is None else self.path.parent / ckpt
        if full.is_dir():
            raise BtmError(f"expert {name!r}: checkpoint {full} is a directory, not a checkpoint file")
        if not full.is_file():
            raise BtmError(f"expert {name!r}: checkpoint {full} does not exist")
        expert = Expert(id=max((e.id for e in self.experts), default=-1) + 1, name=name, domains=list(domains),
                        checkpoint=str(ckpt), sha256=sha256 or sha256_file(full),
                        parents=parents, updates=updates, tokens=tokens, metrics=dict(metrics or {}))
        self.experts.append(expert)
        self.missing = [m for m in self.missing if m != name]
        return expert

    def remove(self, name: str) -> Expert:
        expert = self.get(name)
        self.experts = [e for e in self.experts if e.name != name]
        return expert

    def verify(self) -> list[str]:
        """Names of experts whose checkpoint is missing or whose sha256 changed."""
        bad = []
        for e in self.experts:
            p = self.checkpoint_path(e)
            if not p.is_file() or sha256_file(p) != e.sha256:
                bad.append(e.name)
        return bad

    # ---- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "run": self.run, "missing": list(self.missing),
                "experts": [dataclasses.asdict(e) for e in self.experts]}

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.path)
        # allow_nan=False: forest.json is read by other tools; a NaN would make it non-standard JSON.
        atomic_write_json(path, self.to_dict(), allow_nan=False)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Forest":
        path = Path(path)
        if path.is_dir():
            path = path / FOREST_FILE
        try:
            data = read_versioned_json(path, what="forest manifest", key="format", version=FORMAT_VERSION,
                                       missing=f"no forest manifest at {path} (has the merge stage run?)")
        except BtmError as e:
            if not path.exists():
                raise
            raise BtmError(f"{e}; if it is a run's manifest, delete it and run `btm run` again: the merge "
                           "stage rebuilds it from the finished experts (experts added by hand with "
                           "`btm forest add` must be added again)") from None
        experts = [Expert.from_dict(e, str(path)) for e in data.get("experts", [])]
        return cls(run=data.get("run", ""), experts=experts, missing=list(data.get("missing", [])), path=path)

    @classmethod
    def load_or_new(cls, path: str | Path, run: str) -> "Forest":
        path = Path(path)
        if path.is_dir():
            path = path / FOREST_FILE
        return cls.load(path) if path.exists() else cls(run=run, path=path)


def _checked_parents(name: str, parents: dict) -> dict[str, float]:
    """Parent name -> branch weight; a weight must be a finite number >= 0 (a lineage with a
    NaN or negative weight describes no average of the parents)."""
    out = {}
    for parent, weight in parents.items():
        try:
            w = float(weight)
        except (TypeError, ValueError):
            w = math.nan
        if not math.isfinite(w) or w < 0:
            raise BtmError(f"expert {name!r}: parent {shown(parent)} has weight {shown(weight)}; "
                           "a branch weight must be a finite number >= 0")
        out[str(parent)] = w
    return out


@contextlib.contextmanager
def editing(path: str | Path, run: str = ""):
    """Load, yield and save the forest under a file lock (incremental experts add concurrently)."""
    from filelock import FileLock

    path = Path(path)
    if path.is_dir():
        path = path / FOREST_FILE
    with FileLock(str(path) + ".lock", timeout=300):
        forest = Forest.load_or_new(path, run)
        yield forest
        forest.save()


def manifest_path(source: str | Path) -> Path:
    """The forest.json of a run directory, or ``source`` itself when it is a file."""
    source = Path(source)
    return source / FOREST_FILE if source.is_dir() else source


def verified_checkpoints(source: str | Path) -> dict[str, Path]:
    """{name: checkpoint} of the forest manifest of ``source`` (a run dir or its forest.json),
    after checking that every checkpoint still has the sha256 recorded at the merge."""
    forest = Forest.load(manifest_path(source))
    if not forest.experts:
        raise BtmError(f"{forest.path} lists no experts")
    changed = forest.verify()
    if changed:
        raise BtmError(f"{forest.path}: checkpoint missing or changed since merge for expert(s) "
                       f"{', '.join(changed)}")
    return {e.name: forest.checkpoint_path(e) for e in forest.experts}


def expert_checkpoints(source: str | Path) -> dict[str, Path]:
    """{name: checkpoint} of a forest SOURCE: a run dir or forest.json (``verified_checkpoints``),
    else a directory of ``<name>.pt`` files (the file stem is the expert's name)."""
    source = Path(source)
    if manifest_path(source).is_file():
        return verified_checkpoints(source)
    files = sorted(p for p in source.glob("*.pt") if p.is_file()) if source.is_dir() else []
    if not files:
        raise BtmError(f"{source} is neither a run dir with {FOREST_FILE}, a {FOREST_FILE}, nor a "
                       "directory of *.pt expert checkpoints")
    return {validate_name(p.stem, f"expert name (file {p})"): p for p in files}
