"""tf-idf -> truncated SVD -> L2 normalisation: the document embedding c-BTM clusters on.

The fitted state is plain data (vocabulary list, idf vector, SVD components), and the
transform is rebuilt from it at load time: a ``CountVectorizer`` with the saved vocabulary
counts terms, and the weighting and projection below are our own few lines, used both when
fitting and after loading, so a loaded embedder gives bit-identical embeddings.

Text normalisation: lower case, every number (``3``, ``1,024``, ``2.5``) becomes the single
token ``__num__``, English stop words are dropped, tokens are runs of 2+ word characters.
Term frequency is sublinear (``1 + log tf``), idf is smoothed (scikit-learn's default
``log((1 + n) / (1 + df)) + 1``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from launcher.contract.errors import BtmError

NUMBER_TOKEN = "__num__"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def normalize_text(text: str) -> str:
    """Lower-case and map every number to one token (the vectorizer's preprocessor)."""
    return _NUMBER.sub(f" {NUMBER_TOKEN} ", text.lower())


@dataclass
class TextEmbedder:
    """Fitted tf-idf + SVD. ``embed(texts)`` -> float32 [n, dims], rows of norm 1 (or 0)."""

    vocabulary: list[str]
    idf: np.ndarray  # float64 [V]
    components: np.ndarray  # float32 [dims, V]

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    def __post_init__(self):
        self._counter = None
        self._projection = None  # components.T as float64, made once

    def counts(self, texts: Sequence[str]):
        """Sparse term counts [n, V] over the saved vocabulary."""
        if self._counter is None:
            from sklearn.feature_extraction.text import CountVectorizer

            self._counter = CountVectorizer(
                vocabulary={t: i for i, t in enumerate(self.vocabulary)},
                preprocessor=normalize_text, token_pattern=TOKEN_PATTERN, dtype=np.float64)
        return self._counter.transform(list(texts))

    def embed_counts(self, counts) -> np.ndarray:
        """tf-idf weight, L2-normalise, project on the SVD components, L2-normalise again."""
        from sklearn.preprocessing import normalize

        x = counts.astype(np.float64, copy=True).tocsr()
        np.log(x.data, out=x.data)
        x.data += 1.0
        x = normalize(x.multiply(self.idf[None, :]).tocsr(), norm="l2", copy=False)
        if self._projection is None:
            self._projection = np.ascontiguousarray(self.components.T, dtype=np.float64)
        h = np.asarray(x @ self._projection, dtype=np.float64)
        return normalize(h, norm="l2", copy=False).astype(np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dims), dtype=np.float32)
        return self.embed_counts(self.counts(texts))


def fit_embedder(texts: Iterable[str], *, dims: int = 100, max_features: int | None = 50_000,
                 min_df: int = 1, seed: int = 0) -> tuple[TextEmbedder, np.ndarray]:
    """Fit tf-idf and SVD on ``texts`` (streamed once); return the embedder and the texts'
    embeddings [n, dims'] with dims' = min(dims, n, vocabulary size)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.utils.extmath import randomized_svd

    counter = CountVectorizer(preprocessor=normalize_text, token_pattern=TOKEN_PATTERN,
                              stop_words="english", max_features=max_features, min_df=min_df,
                              dtype=np.float64)
    try:
        counts = counter.fit_transform(texts).tocsr()
    except ValueError as e:  # "empty vocabulary; perhaps the documents only contain stop words"
        raise BtmError(f"cannot build a tf-idf vocabulary from the fitting documents: {e}") from None
    vocab_index = counter.vocabulary_
    vocabulary = [None] * len(vocab_index)
    for term, i in vocab_index.items():
        vocabulary[i] = term
    n, v = counts.shape
    df = np.bincount(counts.indices, minlength=v)
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0

    # The SVD runs on the same tf-idf rows that embed_counts builds.
    from sklearn.preprocessing import normalize

    x = counts.copy()
    np.log(x.data, out=x.data)
    x.data += 1.0
    x = normalize(x.multiply(idf[None, :]).tocsr(), norm="l2", copy=False)
    k = max(1, min(dims, n, v))
    if k >= min(n, v):  # small problem: exact SVD
        _, _, vt = np.linalg.svd(x.toarray(), full_matrices=False)
        vt = vt[:k]
    else:
        _, _, vt = randomized_svd(x, k, n_iter=5, random_state=seed)
    # Deterministic signs: the largest-magnitude entry of each component is positive.
    signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
    signs[signs == 0] = 1.0
    embedder = TextEmbedder(vocabulary=vocabulary, idf=idf,
                            components=(vt * signs[:, None]).astype(np.float32))
    return embedder, embedder.embed_counts(counts)
