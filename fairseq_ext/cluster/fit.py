"""Fit a c-BTM cluster model: sample documents, embed (tf-idf + SVD), balanced k-means.

``fit_corpus`` streams a corpus directory twice (count, then read only the sampled documents)
so the corpus never has to fit in memory; the sample's sparse tf-idf matrix and its dense
[sample_size, dims] float32 embeddings do. ``fit_clusters`` is the same on an in-memory list.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from launcher.contract.errors import BtmError

from fairseq_ext.cluster.corpus import find_sources, is_empty, iter_documents
from fairseq_ext.cluster.kmeans import balanced_kmeans
from fairseq_ext.cluster.model_io import ClusterModel, text_hash
from fairseq_ext.cluster.tfidf import fit_embedder


@dataclass
class FitSettings:
    k: int = field(metadata={"help": "number of clusters (experts)"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, SVD and k-means"})
    sample_size: int = field(default=100_000, metadata={"help": "documents to fit on (all if fewer)"})
    dims: int = field(default=100, metadata={"help": "SVD dimensions of the embedding"})
    max_features: int = field(default=50_000, metadata={"help": "tf-idf vocabulary size cap"})
    min_df: int = field(default=1, metadata={"help": "drop terms in fewer documents than this"})
    max_iter: int = field(default=100, metadata={"help": "Lloyd iterations (full-batch mode)"})
    n_init: int = field(default=3, metadata={"help": "k-means++ restarts; the lowest inertia wins"})
    batch_size: int = field(default=262_144, metadata={"help": "minibatch size; samples up to this size use full-batch Lloyd"})
    threads: int = field(default=1, metadata={"help": "BLAS threads during k-means (1 is fastest on shared CPUs)"})
    split: str = field(default="train", metadata={"help": "corpus split to fit on"})
    text_field: str = field(default="text", metadata={"help": "JSON field holding the text"})
    domains: list[str] | None = field(default=None, metadata={"help": "corpus subdirectories to use (default all)"})

    def validate(self) -> None:
        for name in ("k", "sample_size", "dims", "max_features", "min_df", "max_iter", "n_init", "batch_size", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BtmError(f"cluster setting {name}={value!r} must be a positive integer")


def _too_few(n: int, k: int, where: str) -> BtmError:
    return BtmError(f"cannot make k={k} clusters from {n} non-empty document(s) in {where}: "
                    f"k must be at most the number of documents")


def fit_clusters(texts: Sequence[str], settings: FitSettings) -> ClusterModel:
    """Fit on in-memory texts (empty ones are ignored). No sample bookkeeping."""
    settings.validate()
    texts = [t for t in texts if not is_empty(t)]
    if len(texts) < settings.k:
        raise _too_few(len(texts), settings.k, "the given texts")
    rng = np.random.default_rng(settings.seed)
    if len(texts) > settings.sample_size:
        keep = np.sort(rng.choice(len(texts), settings.sample_size, replace=False))
        texts = [texts[i] for i in keep]
    return _fit(texts, settings)[0]


def fit_corpus(corpus_dir: str | Path, settings: FitSettings) -> ClusterModel:
    """Fit on the ``settings.split`` documents of a corpus directory, streamed."""
    settings.validate()
    sources = find_sources(corpus_dir, splits=[settings.split], domains=settings.domains)
    # Pass 1: which documents are non-empty (global ordinal over non-empty documents).
    nonempty = [sum(1 for t in iter_documents(s, settings.text_field) if not is_empty(t)) for s in sources]
    n = sum(nonempty)
    if n < settings.k:
        raise _too_few(n, settings.k, f"the {settings.split} split of {corpus_dir}")
    rng = np.random.default_rng(settings.seed)
    chosen = (np.arange(n) if n <= settings.sample_size
              else np.sort(rng.choice(n, settings.sample_size, replace=False)))
    ids: list[tuple[int, int, int]] = []  # (source id, document index, text hash)

    def sampled_texts() -> Iterable[str]:
        ordinal, pos = 0, 0
        for sid, source in enumerate(sources):
            for index, text in enumerate(iter_documents(source, settings.text_field)):
                if is_empty(text):
                    continue
                if pos < len(chosen) and chosen[pos] == ordinal:
                    ids.append((sid, index, text_hash(text)))
                    pos += 1
                    yield text
                ordinal += 1

    model, labels = _fit(sampled_texts(), settings)
    model.sample_sources = [s.key for s in sources]
    arr = np.array(ids, dtype=np.uint64).reshape(-1, 3)
    model.sample_source = arr[:, 0].astype(np.int32)
    model.sample_index = arr[:, 1].astype(np.int64)
    model.sample_hash = arr[:, 2].astype(np.uint64)
    model.sample_cluster = labels.astype(np.int32)
    model.settings["documents"] = int(n)
    return model


def _fit(texts: Iterable[str], settings: FitSettings) -> tuple[ClusterModel, np.ndarray]:
    embedder, x = fit_embedder(texts, dims=settings.dims, max_features=settings.max_features,
                               min_df=settings.min_df, seed=settings.seed)
    if len(x) < settings.k:
        raise _too_few(len(x), settings.k, "the fitting sample")
    result = balanced_kmeans(x, settings.k, seed=settings.seed, max_iter=settings.max_iter,
                             n_init=settings.n_init, batch_size=settings.batch_size,
                             threads=settings.threads)
    recorded = asdict(settings)
    recorded.update(sample_documents=int(len(x)), iterations=result.iterations,
                    inertia=result.inertia)
    model = ClusterModel(embedder=embedder, centres=result.centres,
                         sizes=np.bincount(result.labels, minlength=settings.k).astype(np.int64),
                         settings=recorded)
    return model, result.labels
