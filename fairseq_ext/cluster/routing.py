"""c-BTM routing: weight the experts of a cluster forest by how close a context is to each
cluster centre.

    w = softmax(-||h - c_j||^2 / T) over the k centres,  h = embed(context)

then keep the ``top_k`` largest weights and renormalise (ties -> lower cluster index). A context
with no known term (empty prefix, e.g. the first token of a document) embeds to the zero vector
and carries no evidence, so it is routed by the cluster prior (each cluster's share of the
fitting sample), with the same top-k rule.

``token_route_weights`` produces the per-token weights [T, k] for a scored split, in the token
order of ``fairseq_ext.scoring.Scores`` (documents in order, every target token of each), to be
fed to the "given weights" mixing of ``fairseq_ext.ensemble``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from fairseq_ext.cluster.kmeans import squared_distances
from fairseq_ext.cluster.model_io import ClusterModel


def weights_from_embeddings(model: ClusterModel, h: np.ndarray, temperature: float = 0.1,
                            top_k: int | None = None) -> np.ndarray:
    if not temperature > 0:
        raise ValueError(f"routing temperature must be > 0, got {temperature}")
    k = model.k
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"routing top_k must be >= 1, got {top_k}")
    logits = -squared_distances(h.astype(np.float64), model.centres.astype(np.float64)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    no_evidence = ~np.any(h != 0, axis=1)
    w[no_evidence] = model.prior
    if top_k is not None and top_k < k:
        # stable sort on -w: among equal weights the lower cluster index is kept
        drop = np.argsort(-w, axis=1, kind="stable")[:, top_k:]
        np.put_along_axis(w, drop, 0.0, axis=1)
        w /= w.sum(axis=1, keepdims=True)
    return w


def route_weights(model: ClusterModel, texts: Sequence[str], temperature: float = 0.1,
                  top_k: int | None = None) -> np.ndarray:
    """Expert weights [n_texts, k] (float64, rows sum to 1) for context texts."""
    return weights_from_embeddings(model, model.embed(list(texts)), temperature, top_k)


def token_route_weights(model: ClusterModel, doc_pieces: Sequence[Sequence[str]], *,
                        stride: int = 32, temperature: float = 0.1, top_k: int | None = None,
                        batch: int = 256) -> np.ndarray:
    """Per-token expert weights [T, k] for a scored split, from decoded token texts.

    ``doc_pieces[d][t]`` is the decoded text of target token t of document d (so
    ``"".join(doc_pieces[d][:t])`` is the text a model has seen before predicting token t).
    The weights for tokens t in [m*stride, (m+1)*stride) come from the document's text before
    token m*stride, so no token's own text or later text is ever used. T = sum of lengths.
    """
    return _per_token(model, [len(p) for p in doc_pieces],
                      lambda d, t: "".join(doc_pieces[d][:t]), stride, temperature, top_k, batch)


def token_route_weights_from_ids(model: ClusterModel, targets: np.ndarray, doc_starts: np.ndarray,
                                 decode: Callable[[Sequence[int]], str], *, stride: int = 32,
                                 temperature: float = 0.1, top_k: int | None = None,
                                 batch: int = 256) -> np.ndarray:
    """The same from a scored split's target ids (``Scores.targets``, ``Scores.doc_starts``)
    and a decoder of an id prefix, e.g. ``lambda ids: data_prep.decode_ids(data_dir, ids)``
    (which drops bos/pad/eos). Feed the result to ``ensemble.mix_with_weights``."""
    targets = np.asarray(targets)
    bounds = np.append(np.asarray(doc_starts, dtype=np.int64), len(targets))
    if bounds[0] != 0 or np.any(np.diff(bounds) <= 0):
        raise ValueError(f"doc_starts must start at 0 and increase below {len(targets)}")
    return _per_token(model, np.diff(bounds).tolist(),
                      lambda d, t: decode(targets[bounds[d]:bounds[d] + t].tolist()),
                      stride, temperature, top_k, batch)


def _per_token(model, lengths: list[int], prefix_text: Callable[[int, int], str], stride: int,
               temperature: float, top_k: int | None, batch: int) -> np.ndarray:
    if stride < 1:
        raise ValueError(f"routing stride must be >= 1, got {stride}")
    prefixes: list[str] = []
    spans: list[tuple[int, int]] = []  # the token range each prefix's weights cover
    offset = 0
    for d, n in enumerate(lengths):
        for start in range(0, n, stride):
            prefixes.append(prefix_text(d, start))
            spans.append((offset + start, offset + min(start + stride, n)))
        offset += n
    out = np.empty((offset, model.k), dtype=np.float64)
    for b in range(0, len(prefixes), batch):
        w = route_weights(model, prefixes[b:b + batch], temperature, top_k)
        for (lo, hi), row in zip(spans[b:b + batch], w):
            out[lo:hi] = row
    return out
