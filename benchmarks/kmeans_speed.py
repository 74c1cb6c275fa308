"""Balanced k-means (fairseq_ext.cluster.kmeans) against scikit-learn's KMeans, side by side.

Same data, same k, same dimensions, one k-means++ init each, timed in the same run. Prints
documents per second for both, the speed ratio (target >= 0.5x) and the balance of each
result (largest / smallest cluster; target <= 1.05 for ours).

Data: unit-norm vectors (like the tf-idf + SVD embeddings) drawn around k_true random
directions with unequal cluster weights, so unconstrained k-means is *not* balanced; with
``--corpus DIR`` it also runs on the real embeddings of a corpus's train split.

    python benchmarks/kmeans_speed.py                     # default grid
    python benchmarks/kmeans_speed.py --n 200000 --k 64   # one setting
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_ext.cluster.kmeans import balanced_kmeans  # noqa: E402


def synthetic(n: int, d: int, k_true: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((k_true, d))
    weights = rng.dirichlet(np.full(k_true, 0.7))  # unequal cluster sizes
    z = rng.choice(k_true, size=n, p=weights)
    x = directions[z] + 0.8 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def corpus_embeddings(corpus: str, seed: int) -> np.ndarray:
    from fairseq_ext.cluster.tfidf import fit_embedder
    from launcher.contract.corpus import find_sources, iter_corpus

    texts = (doc.text for doc in iter_corpus(find_sources(corpus, splits=["train"])))
    return fit_embedder(texts, dims=100, seed=seed)[1]


def balance(labels: np.ndarray, k: int) -> float:
    sizes = np.bincount(labels, minlength=k)
    return float(sizes.max() / max(sizes.min(), 1)) if sizes.min() > 0 else float("inf")


def run(name: str, x: np.ndarray, k: int, seed: int, repeats: int, batch_size: int) -> dict:
    """Best of ``repeats`` for: ours (defaults: 1 BLAS thread), scikit-learn with its default
    threads, scikit-learn limited to 1 thread. The ratio is against the faster scikit-learn."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    n = len(x)
    ours, theirs, theirs1 = [], [], []
    for r in range(repeats):
        t = time.perf_counter()
        res = balanced_kmeans(x, k, seed=seed + r, n_init=1, batch_size=batch_size)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        km = KMeans(n_clusters=k, n_init=1, random_state=seed + r).fit(x)
        theirs.append(time.perf_counter() - t)
        with threadpool_limits(limits=1):
            t = time.perf_counter()
            KMeans(n_clusters=k, n_init=1, random_state=seed + r).fit(x)
            theirs1.append(time.perf_counter() - t)
    o, s = min(ours), min(min(theirs), min(theirs1))
    mode = "full-batch" if n <= batch_size else f"minibatch {batch_size}"
    row = dict(data=name, n=n, d=x.shape[1], k=k, mode=mode, ours_docs_s=n / o,
               sklearn_docs_s=n / min(theirs), sklearn1_docs_s=n / min(theirs1),
               ratio=s / o, ours_balance=balance(res.labels, k),
               sklearn_balance=balance(km.labels_, k), ours_iters=res.iterations, sklearn_iters=km.n_iter_)
    print(f"| {name} | {n} | {row['d']} | {k} | {mode} | {row['ours_docs_s']:,.0f} | "
          f"{row['sklearn_docs_s']:,.0f} | {row['sklearn1_docs_s']:,.0f} | {row['ratio']:.2f}x | "
          f"{row['ours_balance']:.3f} | {row['sklearn_balance']:.2f} |", flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="*", default=[20_000, 100_000, 400_000], help="documents")
    p.add_argument("--k", type=int, nargs="*", default=[8, 32], help="clusters")
    p.add_argument("--d", type=int, default=100, help="dimensions (SVD dims)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timing repeats (best is kept)")
    p.add_argument("--batch-size", type=int, default=262_144, help="our minibatch size")
    p.add_argument("--corpus", default=None, help="also run on the train split of this corpus")
    args = p.parse_args()

    import sklearn
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"numpy {np.__version__}, scikit-learn {sklearn.__version__}")
    print("| data | N | dims | k | our mode | ours docs/s | sklearn docs/s | sklearn 1-thread docs/s | "
          "ours / best sklearn | ours max/min size | sklearn max/min size |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in args.n:
        x = synthetic(n, args.d, 12, args.seed)
        for k in args.k:
            rows.append(run("synthetic", x, k, args.seed, args.repeats, args.batch_size))
    if args.corpus:
        x = corpus_embeddings(args.corpus, args.seed)
        for k in args.k:
            rows.append(run(f"corpus {Path(args.corpus).name}", x, k, args.seed, args.repeats, args.batch_size))
    worst_ratio = min(r["ratio"] for r in rows)
    worst_balance = max(r["ours_balance"] for r in rows)
    ok = worst_ratio >= 0.5 and worst_balance <= 1.05
    print(f"worst speed ratio {worst_ratio:.2f}x (target >= 0.5x), worst balance "
          f"{worst_balance:.3f} (target <= 1.05): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
