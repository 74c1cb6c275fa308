"""btm verbs: cluster (c-BTM unsupervised domains).

    btm cluster fit    --corpus DIR --k K --out MODEL_DIR
    btm cluster assign --model MODEL_DIR --corpus DIR --out DOMAINS_DIR [--shard I --num-shards S | --merge --num-shards S]

numpy/scikit-learn are imported inside the handlers (fairseq_ext.cluster never imports fairseq).
"""
from __future__ import annotations

import argparse

from launcher.contract.errors import BtmError


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _fit(args) -> int:
    from fairseq_ext.cluster.fit import FitSettings
    from fairseq_ext.cluster.model_io import read_model_meta
    from fairseq_ext.cluster.pipeline import fit_model_dir

    settings = FitSettings(k=args.k, seed=args.seed, sample_size=args.sample_size, dims=args.dims,
                           max_features=args.max_features, min_df=args.min_df,
                           max_iter=args.max_iter, n_init=args.n_init, batch_size=args.batch_size, threads=args.threads,
                           split=args.split, text_field=args.text_field, domains=args.domains)
    fitted = fit_model_dir(args.corpus, args.out, settings, force=args.force)
    meta = read_model_meta(args.out)
    state = "fitted" if fitted else "already fitted (same settings and corpus; --force refits)"
    print(f"{args.out}: {state}: k={meta['k']} dims={meta['dims']} vocabulary={len(meta['vocabulary'])} "
          f"sample={meta['settings']['sample_documents']} sizes={meta['sizes']}")
    return 0


def _assign(args) -> int:
    from fairseq_ext.cluster.assign import AssignSettings, assign_corpus, assign_shard, merge_shards

    settings = AssignSettings(splits=args.splits, domains=args.domains, text_field=args.text_field)
    if args.shard is not None and args.merge:
        raise BtmError("--shard and --merge are separate steps: run each shard, then --merge")
    if args.shard is not None:
        summary = assign_shard(args.model, args.corpus, args.out, args.shard, args.num_shards, settings)
        if "skipped" in summary:
            print(f"shard {args.shard}/{args.num_shards}: {summary['skipped']}")
        else:
            lo, hi = summary["documents"]
            print(f"shard {args.shard}/{args.num_shards}: documents {lo}..{hi - 1} assigned")
        return 0
    if args.merge:
        report = merge_shards(args.model, args.corpus, args.out, args.num_shards, settings)
    else:
        report = assign_corpus(args.model, args.corpus, args.out, settings, args.num_shards)
    sizes = {name: sum(s.values()) for name, s in report["sizes"].items()}
    print(f"{args.out}: {report['documents']} documents in {report['k']} clusters {sizes}")
    if report.get("purity"):
        print(f"purity (as assigned) {report['purity']['all']:.3f}, "
              f"nearest centre {report['purity_nearest_centre']['all']:.3f}")
    return 0


def register(subparsers):
    from pathlib import Path

    parser = subparsers.add_parser(
        "cluster", help="c-BTM: cluster a corpus into k balanced unsupervised domains",
        description="c-BTM clustering: tf-idf + SVD embeddings, balanced k-means (no cluster "
                    "holds more than ceil(N/k) documents), one domain per cluster.")
    verbs = parser.add_subparsers(dest="cluster_command", metavar="VERB")
    verbs.required = True

    fit = verbs.add_parser("fit", help="fit tf-idf, SVD and balanced k-means on a corpus sample",
                           description="Fit on the train split of CORPUS (a sample of "
                           "--sample-size documents) and save OUT/model.json + OUT/model.npz.")
    fit.add_argument("--corpus", type=Path, required=True, help="corpus dir: <domain>/<split>.jsonl[.gz]|.txt")
    fit.add_argument("--k", type=int, required=True, help="number of clusters")
    fit.add_argument("--out", type=Path, required=True, help="model directory to write")
    fit.add_argument("--seed", type=int, default=0, help="seed (sampling, SVD, k-means) [0]")
    fit.add_argument("--sample-size", type=int, default=100_000, help="documents to fit on [100000]")
    fit.add_argument("--dims", type=int, default=100, help="SVD dimensions [100]")
    fit.add_argument("--max-features", type=int, default=50_000, help="tf-idf vocabulary cap [50000]")
    fit.add_argument("--min-df", type=int, default=1, help="minimum document frequency of a term [1]")
    fit.add_argument("--max-iter", type=int, default=100, help="Lloyd iterations [100]")
    fit.add_argument("--n-init", type=int, default=3, help="k-means++ restarts [3]")
    fit.add_argument("--batch-size", type=int, default=262_144,
                     help="minibatch size; larger samples are fitted in minibatches [262144]")
    fit.add_argument("--threads", type=int, default=1, help="BLAS threads during k-means [1]")
    fit.add_argument("--split", default="train", help="split to fit on [train]")
    fit.add_argument("--text-field", default="text", help="JSON field with the text [text]")
    fit.add_argument("--domains", type=_csv, default=None, help="comma-separated subdirectories (default all)")
    fit.add_argument("--force", action="store_true", help="refit even if OUT holds the same fit")
    fit.set_defaults(func=_fit)

    assign = verbs.add_parser(
        "assign", help="assign every document to a cluster; write OUT/cluster_<i>/<split>.jsonl",
        description="Assign every document of CORPUS to its cluster (fitting-sample documents keep "
        "their balanced cluster, others go to the nearest centre) and write a corpus with one "
        "domain per cluster plus OUT/cluster_report.json. On SLURM run one task per --shard, "
        "then one --merge.")
    assign.add_argument("--model", type=Path, required=True, help="model directory from 'btm cluster fit'")
    assign.add_argument("--corpus", type=Path, required=True, help="corpus directory to assign")
    assign.add_argument("--out", type=Path, required=True, help="output corpus directory")
    assign.add_argument("--shard", type=int, default=None, help="only this shard (0-based); merge later")
    assign.add_argument("--num-shards", type=int, default=1, help="number of shards [1]")
    assign.add_argument("--merge", action="store_true", help="combine finished shards into OUT")
    assign.add_argument("--splits", type=_csv, default=["train", "valid", "test"],
                        help="comma-separated splits [train,valid,test]")
    assign.add_argument("--text-field", default="text",
                        help="JSON field with the text, in CORPUS and in the cluster files written "
                             "(prepare OUT with the same --text-field) [text]")
    assign.add_argument("--domains", type=_csv, default=None, help="comma-separated subdirectories (default all)")
    assign.set_defaults(func=_assign)
