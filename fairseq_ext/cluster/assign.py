"""Assign every document of a corpus to a cluster and write one domain per cluster.

Output (``OUT``), the corpus layout ``btm data prepare`` reads:

    OUT/cluster_<i>/{train,valid,test}.jsonl   {TEXT_FIELD: ...} per line, corpus order
    OUT/assignments.npz                        source id, document index, cluster, nearest
    OUT/cluster_report.json                    sizes, purity against domain labels; written
                                               last, so it marks a finished assignment

The documents are those ``launcher.contract.corpus`` reads, numbered as it numbers them, and
every one of them is written to exactly one cluster, under the settings' text field (the field
the clustered corpus is then prepared with): preparing the clusters binarizes the same
documents as preparing the input corpus would.

Rule: a document of the fitting sample (same source, index and text hash) keeps the balanced
cluster it was fitted with; every other document (other splits, documents beyond the sample)
goes to its nearest centre without the balance constraint, as the paper does for new data.

Work is split into ``num_shards`` contiguous slices of the corpus order: with N documents,
shard S holds corpus positions ``[S*N // num_shards, (S+1)*N // num_shards)`` (one SLURM
array task each). A shard writes ``OUT/.shards/<num_shards>/shard_<S>/`` and a merge step
concatenates the shards in order, so the result does not depend on the number of shards.
Everything is written atomically, and a shard or a merge whose outputs exist for the same
model, corpus and settings is skipped.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from launcher.contract.atomic import atomic_path, atomic_write_json
from launcher.contract.corpus import SPLITS, Document, count_documents, find_sources, iter_corpus
from launcher.contract.errors import BtmError

from fairseq_ext.cluster.kmeans import nearest_centre, squared_distances
from fairseq_ext.cluster.model_io import load_model, model_fingerprint, text_hash

REPORT = "cluster_report.json"
COUNTS = ".document_counts.json"


@dataclass
class AssignSettings:
    splits: list[str] = field(default_factory=lambda: list(SPLITS),
                              metadata={"help": "splits to assign (each keeps its split)"})
    domains: list[str] | None = field(default=None, metadata={"help": "corpus subdirectories (default all)"})
    text_field: str = field(default="text", metadata={"help": "JSON field holding the text"})
    batch_docs: int = field(default=256, metadata={"help": "documents embedded at once"})


def cluster_name(i: int) -> str:
    return f"cluster_{i}"


def _fingerprint(model_dir, corpus_dir, sources, num_shards, settings) -> dict:
    return {
        "model_sha256": model_fingerprint(model_dir),
        "sources": [[s.key, os.path.getsize(s.path), os.stat(s.path).st_mtime_ns] for s in sources],
        "num_shards": num_shards, "splits": list(settings.splits), "text_field": settings.text_field,
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _shard_dir(out: Path, shard: int, num_shards: int) -> Path:
    return out / ".shards" / str(num_shards) / f"shard_{shard}"


def _check_shard_args(shard: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise BtmError(f"--shard {shard} --num-shards {num_shards}: need 0 <= shard < num_shards")


def assign_shard(model_dir, corpus_dir, out_dir, shard: int = 0, num_shards: int = 1,
                 settings: AssignSettings | None = None) -> dict:
    """Assign the documents of one shard; returns the shard's summary (shard.json)."""
    settings = settings or AssignSettings()
    _check_shard_args(shard, num_shards)
    out = Path(out_dir)
    model = load_model(model_dir)
    sources = find_sources(corpus_dir, splits=settings.splits, domains=settings.domains)
    fp = _fingerprint(model_dir, corpus_dir, sources, num_shards, settings)
    report = _read_json(out / REPORT)
    if report and report.get("fingerprint") == fp:
        return {"skipped": "merged report already exists"}
    sdir = _shard_dir(out, shard, num_shards)
    done = _read_json(sdir / "shard.json")
    if done and done.get("fingerprint") == fp:
        return done

    counts = document_counts(sources, out, settings.text_field)
    total = sum(counts)
    lo, hi = shard * total // num_shards, (shard + 1) * total // num_shards
    docs = iter_corpus(sources, settings.text_field, start=lo, stop=hi, counts=counts)
    splits = sorted({s.split for s in sources})
    with _cluster_files(sdir, model.k, splits, settings.text_field) as write:
        tally = _assign_documents(model, sources, docs, write, settings.batch_docs)
    rows = np.concatenate(tally.rows) if tally.rows else np.zeros((0, 4), dtype=np.int64)
    with atomic_path(sdir / "assignments.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, source=rows[:, 0].astype(np.int32), index=rows[:, 1],
                 cluster=rows[:, 2].astype(np.int32), nearest=rows[:, 3].astype(np.int32))
    summary = {"fingerprint": fp, "shard": shard, "num_shards": num_shards, "documents": [lo, hi],
               "assigned": tally.assigned.tolist(), "nearest": tally.nearest.tolist(),
               "from_sample": tally.from_sample}
    atomic_write_json(sdir / "shard.json", summary)
    return summary


def count_corpus(corpus_dir, out_dir, settings: AssignSettings | None = None) -> list[int]:
    """Count the documents of every source once, for the assign tasks (``document_counts``)."""
    settings = settings or AssignSettings()
    sources = find_sources(corpus_dir, splits=settings.splits, domains=settings.domains)
    return document_counts(sources, Path(out_dir), settings.text_field)


def document_counts(sources, out: Path, text_field: str) -> list[int]:
    """The documents of each source, from ``OUT/.document_counts.json`` when it names the same
    files (path, size, mtime) and field, else counted (one streaming pass) and saved there: the
    pipeline counts once before the assign array, so no task reads the whole corpus to find
    its slice."""
    key = {"text_field": text_field,
           "sources": [[str(s.path.resolve()), os.path.getsize(s.path), os.stat(s.path).st_mtime_ns] for s in sources]}
    saved = _read_json(out / COUNTS)
    if saved and saved.get("key") == key:
        return saved["counts"]
    counts = count_documents(sources, text_field)
    atomic_write_json(out / COUNTS, {"key": key, "counts": counts})
    return counts


@contextlib.contextmanager
def _cluster_files(directory: Path, k: int, splits: list[str], text_field: str
                   ) -> Iterator[Callable[[int, str, str], None]]:
    """Yield ``write(cluster, split, text)``, which appends ``{text_field: text}`` to
    ``directory/cluster_<c>/<split>.jsonl``; every file appears when the block ends without error."""
    with contextlib.ExitStack() as stack:
        handles = {}
        for c in range(k):
            for split in splits:
                tmp = stack.enter_context(atomic_path(directory / cluster_name(c) / f"{split}.jsonl"))
                handles[c, split] = stack.enter_context(open(tmp, "w", encoding="utf-8"))

        def write(cluster: int, split: str, text: str) -> None:
            handles[cluster, split].write(json.dumps({text_field: text}, ensure_ascii=False) + "\n")

        yield write


@dataclass
class _Tally:
    """What a shard assigned, per source (row) and cluster (column)."""

    assigned: np.ndarray  # as written
    nearest: np.ndarray  # by nearest centre alone, for comparison
    from_sample: int = 0  # documents that kept their fitting-sample cluster
    rows: list[np.ndarray] = field(default_factory=list)  # per batch: [b, 4] source, index, cluster, nearest


def _assign_documents(model, sources, docs: Iterable[Document], write, batch_docs: int) -> _Tally:
    """Embed ``docs`` in batches, pick each one's cluster (see the module's rule) and write it."""
    lookup = model.sample_lookup()
    tally = _Tally(assigned=np.zeros((len(sources), model.k), dtype=np.int64),
                   nearest=np.zeros((len(sources), model.k), dtype=np.int64))
    docs = iter(docs)
    while batch := list(itertools.islice(docs, batch_docs)):
        near = nearest_centre(model.embed([d.text for d in batch]), model.centres)
        block = np.empty((len(batch), 4), dtype=np.int64)
        for row, (doc, n_c) in enumerate(zip(batch, near)):
            cluster = int(n_c)
            hit = lookup.get((sources[doc.source].key, doc.index))
            if hit is not None and hit[0] == text_hash(doc.text):
                cluster = hit[1]
                tally.from_sample += 1
            write(cluster, sources[doc.source].split, doc.text)
            tally.assigned[doc.source, cluster] += 1
            tally.nearest[doc.source, n_c] += 1
            block[row] = (doc.source, doc.index, cluster, n_c)
        tally.rows.append(block)
    return tally


def merge_shards(model_dir, corpus_dir, out_dir, num_shards: int = 1,
                 settings: AssignSettings | None = None) -> dict:
    """Combine finished shards into OUT/cluster_<i>/ files and the report."""
    settings = settings or AssignSettings()
    out = Path(out_dir)
    model = load_model(model_dir)
    sources = find_sources(corpus_dir, splits=settings.splits, domains=settings.domains)
    fp = _fingerprint(model_dir, corpus_dir, sources, num_shards, settings)
    report = _read_json(out / REPORT)
    if report and report.get("fingerprint") == fp:
        return report
    k = model.k
    stale = sorted(p.name for p in out.glob("cluster_*") if p.is_dir()
                   and p.name not in {cluster_name(c) for c in range(k)})
    if stale:
        raise BtmError(f"{out} holds {stale} from an assignment with another k; "
                       "use a fresh --out directory or remove them")
    summaries, missing = [], []
    for shard in range(num_shards):
        s = _read_json(_shard_dir(out, shard, num_shards) / "shard.json")
        if not s or s.get("fingerprint") != fp:
            missing.append(shard)
        summaries.append(s)
    if missing:
        raise BtmError(f"cannot merge into {out}: shard(s) {missing} of {num_shards} are not "
                       "finished for this model and corpus (run 'btm cluster assign --shard I "
                       f"--num-shards {num_shards}' for each)")

    for c in range(k):
        for split in sorted({s.split for s in sources}):
            with atomic_path(out / cluster_name(c) / f"{split}.jsonl") as tmp, open(tmp, "wb") as dst:
                for shard in range(num_shards):
                    with open(_shard_dir(out, shard, num_shards) / cluster_name(c) / f"{split}.jsonl", "rb") as src:
                        shutil.copyfileobj(src, dst)
    parts = []
    for shard in range(num_shards):
        with np.load(_shard_dir(out, shard, num_shards) / "assignments.npz", allow_pickle=False) as z:
            parts.append({name: z[name] for name in z.files})
    rows = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    moves = _fill_empty_splits(out, model, sources, rows, settings.text_field)
    with atomic_path(out / "assignments.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **rows)

    assigned = np.zeros((len(sources), k), dtype=np.int64)
    np.add.at(assigned, (rows["source"], rows["cluster"]), 1)
    nearest = sum(np.array(s["nearest"], dtype=np.int64).reshape(len(sources), k) for s in summaries)
    report = build_report(model, sources, assigned, nearest,
                          from_sample=sum(s["from_sample"] for s in summaries))
    report.update(fingerprint=fp, model_dir=str(model_dir), corpus_dir=str(corpus_dir),
                  settings=asdict(settings), moved_to_fill_empty_splits=moves)
    atomic_write_json(out / REPORT, report)
    shutil.rmtree(out / ".shards" / str(num_shards), ignore_errors=True)
    with contextlib.suppress(OSError):
        (out / ".shards").rmdir()
    return report


def _fill_empty_splits(out: Path, model, sources, rows: dict, text_field: str) -> list[dict]:
    """Give every cluster at least one document of every split that has >= k documents, so
    ``btm data prepare`` accepts each cluster as a domain (it needs every split non-empty).

    Nearest-centre assignment can leave a small valid/test split without documents for some
    cluster; for each such cluster the document whose move costs least (distance to this
    centre minus distance to its own) is moved from a cluster that keeps at least one. Only
    the affected split is re-read; the moves are listed in the report.
    """
    k = model.k
    split_of = np.array([s.split for s in sources])[rows["source"]]
    moves = []
    for split in sorted(set(split_of)):
        in_split = split_of == split
        counts = np.bincount(rows["cluster"][in_split], minlength=k)
        if counts.min() > 0 or in_split.sum() < k:
            continue
        files = {c: out / cluster_name(c) / f"{split}.jsonl" for c in range(k)}
        lines = {c: _jsonl_lines(files[c]) for c in range(k)}
        embedded = {}
        for c in np.flatnonzero(counts == 0):
            best = None  # (cost increase, donor, line number)
            for donor in np.flatnonzero(counts >= 2):
                if donor not in embedded:
                    embedded[donor] = model.embed([json.loads(x)[text_field] for x in lines[donor]])
                d = squared_distances(embedded[donor], model.centres[[c, donor]])
                j = int(np.argmin(d[:, 0] - d[:, 1]))
                cost = float(d[j, 0] - d[j, 1])
                if best is None or cost < best[0]:
                    best = (cost, int(donor), j)
            _, donor, j = best
            row = np.flatnonzero((rows["cluster"] == donor) & in_split)[j]
            rows["cluster"][row] = c
            lines[c].append(lines[donor].pop(j))
            embedded[donor] = np.delete(embedded[donor], j, axis=0)
            counts[donor] -= 1
            counts[c] += 1
            moves.append({"split": split, "to": cluster_name(c), "from": cluster_name(donor),
                          "source": sources[rows["source"][row]].key, "index": int(rows["index"][row])})
            for cluster in (c, donor):
                with atomic_path(files[cluster]) as tmp:
                    tmp.write_text("".join(lines[cluster]), encoding="utf-8")
    return moves


def _jsonl_lines(path: Path) -> list[str]:
    """The lines of a jsonl file we wrote, each with its "\\n". Split at "\\n" only: json.dumps
    leaves U+2028, U+0085 and the like unescaped, and str.splitlines would cut a line there."""
    return [line + "\n" for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def assign_corpus(model_dir, corpus_dir, out_dir, settings: AssignSettings | None = None,
                  num_shards: int = 1) -> dict:
    """All shards one after the other, then the merge (the local, single-process path)."""
    for shard in range(num_shards):
        assign_shard(model_dir, corpus_dir, out_dir, shard, num_shards, settings)
    return merge_shards(model_dir, corpus_dir, out_dir, num_shards, settings)


def purity(confusion: np.ndarray) -> float | None:
    """confusion [labels, clusters]: share of documents in their cluster's majority label."""
    total = confusion.sum()
    return float(confusion.max(axis=0).sum() / total) if total else None


def build_report(model, sources, assigned, nearest, from_sample: int) -> dict:
    k = model.k
    splits = sorted({s.split for s in sources}, key=SPLITS.index)
    sizes = {cluster_name(c): {split: int(sum(assigned[i, c] for i, s in enumerate(sources)
                                              if s.split == split)) for split in splits}
             for c in range(k)}
    report = {
        "k": k, "clusters": [cluster_name(c) for c in range(k)], "sizes": sizes,
        "documents": int(assigned.sum()),
        "documents_from_fitting_sample": int(from_sample),
        "rule": "fitting-sample documents keep their balanced cluster; all others go to the "
                "nearest centre (no balance constraint)",
        "fit_sample_sizes": [int(s) for s in model.sizes],
    }
    labels = sorted({s.domain for s in sources if s.domain is not None})
    if not labels:
        report.update(labels=None, purity=None, purity_nearest_centre=None, confusion=None)
        return report

    def confusion(counts, split=None):
        m = np.zeros((len(labels), k), dtype=np.int64)
        for i, s in enumerate(sources):
            if split is None or s.split == split:
                m[labels.index(s.domain)] += counts[i]
        return m

    report["labels"] = labels
    report["confusion"] = {split: {lab: row.tolist() for lab, row in zip(labels, confusion(assigned, split))}
                           for split in splits}
    report["purity"] = {split: purity(confusion(assigned, split)) for split in splits}
    report["purity"]["all"] = purity(confusion(assigned))
    report["purity_nearest_centre"] = {split: purity(confusion(nearest, split)) for split in splits}
    report["purity_nearest_centre"]["all"] = purity(confusion(nearest))
    return report
