"""Fit a c-BTM cluster model: sample documents, embed (tf-idf + SVD), balanced k-means.

``fit_corpus`` streams a corpus directory twice (count, then read only the sampled documents)
so the corpus never has to fit in memory; the sample's sparse tf-idf matrix and its dense
[sample_size, dims] float32 embeddings do. ``fit_clusters`` is the same on an in-memory list.
The documents are those ``launcher.contract.corpus`` reads (the ones ``btm data prepare``
binarizes), numbered as it numbers them: the sample is a seeded choice of corpus positions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from launcher.contract.corpus import DOCUMENT_NUMBERING, count_documents, find_sources, iter_corpus
from launcher.contract.errors import BtmError

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
    return BtmError(f"cannot make k={k} clusters from {n} document(s) in {where}: "
                    f"k must be at most the number of documents")


def fit_clusters(texts: Sequence[str], settings: FitSettings) -> ClusterModel:
    """Fit on in-memory texts, one document each. No sample bookkeeping."""
    settings.validate()
    texts = list(texts)
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
    n = sum(count_documents(sources, settings.text_field))  # pass 1
    if n < settings.k:
        raise _too_few(n, settings.k, f"the {settings.split} split of {corpus_dir}")
    rng = np.random.default_rng(settings.seed)
    chosen = (np.arange(n) if n <= settings.sample_size
              else np.sort(rng.choice(n, settings.sample_size, replace=False)))
    ids: list[tuple[int, int, int]] = []  # (source id, document index, text hash)

    def sampled_texts() -> Iterable[str]:  # pass 2: the chosen corpus positions, in order
        pos = 0
        for position, doc in enumerate(iter_corpus(sources, settings.text_field)):
            if pos == len(chosen):
                return
            if chosen[pos] == position:
                ids.append((doc.source, doc.index, text_hash(doc.text)))
                pos += 1
                yield doc.text

    model, labels = _fit(sampled_texts(), settings)
    model.sample_sources = [s.key for s in sources]
    arr = np.array(ids, dtype=np.uint64).reshape(-1, 3)
    model.sample_source = arr[:, 0].astype(np.int32)
    model.sample_index = arr[:, 1].astype(np.int64)
    model.sample_hash = arr[:, 2].astype(np.uint64)
    model.sample_cluster = labels.astype(np.int32)
    model.settings.update(documents=int(n), document_numbering=DOCUMENT_NUMBERING)
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
