"""The fitted c-BTM cluster model and its on-disk form (JSON + npz, never pickle).

``DIR/model.json``: format, settings, vocabulary (term list in column order), cluster sizes,
the fitting-sample sources. ``DIR/model.npz``: ``idf`` [V] float64, ``components`` [d, V]
float32, ``centres`` [k, d] float32, and the balanced assignment of the fitting sample
(``sample_source``, ``sample_index``, ``sample_hash``, ``sample_cluster``) so that ``assign``
gives those documents the same cluster they were fitted with. Loading uses
``np.load(allow_pickle=False)``; nothing else is read.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from launcher.contract.atomic import atomic_path, atomic_write_json, sha256_file
from launcher.contract.errors import BtmError

from fairseq_ext.cluster.tfidf import TextEmbedder

FORMAT = "btm-cluster-model"
VERSION = 1


def text_hash(text: str) -> int:
    """64-bit content hash of a document (identifies fitting-sample documents at assign time)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class ClusterModel:
    embedder: TextEmbedder
    centres: np.ndarray  # float32 [k, d]
    sizes: np.ndarray  # int64 [k]: balanced cluster sizes of the fitting sample
    settings: dict = field(default_factory=dict)  # how it was fitted (seed, dims, ...)
    sample_sources: list[str] = field(default_factory=list)  # Source.key per sample_source id
    sample_source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sample_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sample_hash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    sample_cluster: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.embed(texts)

    @property
    def prior(self) -> np.ndarray:
        """Cluster share of the fitting sample: the routing weights when a context says nothing."""
        return self.sizes / self.sizes.sum()

    def sample_lookup(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(source key, document index) -> (text hash, balanced cluster) for the fitting sample."""
        return {(self.sample_sources[s], int(i)): (int(h), int(c)) for s, i, h, c in
                zip(self.sample_source, self.sample_index, self.sample_hash, self.sample_cluster)}


def save_model(model: ClusterModel, out_dir: str | Path) -> None:
    out = Path(out_dir)
    arrays = dict(idf=model.embedder.idf, components=model.embedder.components,
                  centres=model.centres, sizes=model.sizes, sample_source=model.sample_source,
                  sample_index=model.sample_index, sample_hash=model.sample_hash,
                  sample_cluster=model.sample_cluster)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_path(out / "model.npz") as tmp:
        tmp.write_bytes(buf.getvalue())
    # model.json is written last: its presence with the npz's hash inside marks a finished fit.
    atomic_write_json(out / "model.json", {
        "format": FORMAT, "version": VERSION, "k": model.k, "dims": model.embedder.dims,
        "settings": model.settings, "sizes": [int(s) for s in model.sizes],
        "sample_sources": model.sample_sources, "vocabulary": model.embedder.vocabulary,
        "npz_sha256": sha256_file(out / "model.npz"),
    })


def read_model_meta(model_dir: str | Path) -> dict:
    """``model.json`` of a fitted model; BtmError naming the file if it is missing (or its npz
    is), unreadable or not ours."""
    d = Path(model_dir)
    meta_path, npz_path = d / "model.json", d / "model.npz"
    if not meta_path.is_file() or not npz_path.is_file():
        raise BtmError(f"{d} is not a fitted cluster model (needs model.json and model.npz; "
                       "run 'btm cluster fit')")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BtmError(f"{meta_path}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise BtmError(f"{meta_path}: not a {FORMAT} v{VERSION} file")
    return meta


def load_model(model_dir: str | Path) -> ClusterModel:
    d = Path(model_dir)
    meta_path, npz_path = d / "model.json", d / "model.npz"
    meta = read_model_meta(d)
    if sha256_file(npz_path) != meta.get("npz_sha256"):
        raise BtmError(f"{npz_path} does not match the sha256 recorded in {meta_path}; refit")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (ValueError, OSError) as e:
        raise BtmError(f"could not read {npz_path}: {e}") from e
    embedder = TextEmbedder(vocabulary=list(meta["vocabulary"]), idf=arrays["idf"],
                            components=arrays["components"])
    return ClusterModel(embedder=embedder, centres=arrays["centres"], sizes=arrays["sizes"],
                        settings=meta["settings"], sample_sources=list(meta["sample_sources"]),
                        sample_source=arrays["sample_source"], sample_index=arrays["sample_index"],
                        sample_hash=arrays["sample_hash"], sample_cluster=arrays["sample_cluster"])


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of model.json (which itself records the npz's sha256)."""
    return sha256_file(Path(model_dir) / "model.json")
