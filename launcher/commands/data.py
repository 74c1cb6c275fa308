"""btm verbs: ``btm data prepare`` (tokenizer + binarized multi-domain datasets)."""
from __future__ import annotations

import argparse

from launcher.contract.errors import BtmError


def _domain_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated domain names, got {value!r}")
    return names


def _shard_bytes(mb: float) -> int:
    if not mb * (1 << 20) >= 1:
        raise BtmError(f"invalid --shard-mb {mb}: give a positive size in MB")
    return int(mb * (1 << 20))


def _prepare(args) -> int:
    # imports fairseq only inside its functions; main() has already quieted fairseq's logging
    from fairseq_ext.data_prep import prepare_data

    manifest = prepare_data(
        args.corpus_dir, args.out_dir, domains=args.domains, train_domains=args.train_domains,
        vocab_size=args.vocab_size, text_field=args.text_field, workers=args.workers, seed=args.seed,
        sample_chars=args.sample_chars, character_coverage=args.character_coverage, overwrite=args.overwrite,
        progress=False if args.no_progress else None, shard_bytes=_shard_bytes(args.shard_mb),
        tokenizer=args.tokenizer)
    print(f"prepared {args.out_dir}: {len(manifest['domains'])} domains, vocab size {manifest['vocab_size']}")
    print(f"{'domain/split':<32} {'documents':>10} {'tokens':>12}")
    for key, info in sorted(manifest["datasets"].items()):
        print(f"{key:<32} {info['documents']:>10} {info['tokens']:>12}")
    return 0


def _demo_corpus(args) -> int:
    from launcher.demo_corpus import build_demo_corpus

    description = build_demo_corpus(args.out_dir, size=args.size, seed=args.seed)
    print(f"wrote the demo corpus to {args.out_dir} (Python {description['python']})")
    print(f"{'domain':<20} {'role':<6} {'characters':>11} {'train/valid/test docs':>22}")
    for name, info in description["domains"].items():
        docs = "/".join(str(info["documents"][s]) for s in ("train", "valid", "test"))
        print(f"{name:<20} {info['role']:<6} {info['characters']:>11} {docs:>22}")
    return 0


def _no_subcommand(args) -> int:
    raise BtmError("'btm data' needs a sub-command: btm data prepare CORPUS_DIR OUT_DIR (see btm data --help)")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare multi-domain training data",
                                 description="Prepare multi-domain data for BTM (see docs/data.md).")
    data.set_defaults(func=_no_subcommand)
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p = sub.add_parser(
        "prepare", help="train one tokenizer and binarize every domain",
        description="Train one sentencepiece BPE tokenizer on a domain-balanced sample, build the shared "
                    "fairseq dict.txt, and binarize CORPUS_DIR/<domain>/{train,valid,test}.{jsonl,jsonl.gz,txt} "
                    "into OUT_DIR/<domain>/<split>.bin/.idx (one item per document). Re-running skips "
                    "finished domains; a changed tokenizer setting or training text is an error unless "
                    "--overwrite is given.",
    )
    p.add_argument("corpus_dir", metavar="CORPUS_DIR", help="directory with one subdirectory per domain")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output data directory (e.g. RUN_DIR/data)")
    p.add_argument("--domains", type=_domain_list, default=None, metavar="A,B,...",
                   help="comma-separated domains to prepare (default: every subdirectory)")
    p.add_argument("--train-domains", type=_domain_list, default=None, metavar="A,B,...",
                   help="comma-separated domains whose train split trains the tokenizer (default: --domains)")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary size (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="JSON field holding the document text in .jsonl inputs (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="shards binarized in parallel (default: %(default)s)")
    p.add_argument("--shard-mb", type=float, default=256.0,
                   help="cut each split file into shards of about this many MB, binarized in parallel and merged; "
                        "the output is the same whatever the size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the tokenizer sample (default: %(default)s)")
    p.add_argument("--sample-chars", type=int, default=1_000_000,
                   help="characters sampled per training domain for the tokenizer, equal for every "
                        "domain (default: %(default)s)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of sample characters that get their own piece (0.98-1); rarer ones, and "
                        "any beyond half the vocabulary, are written as byte pieces (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild OUT_DIR when its tokenizer settings or training text differ")
    p.add_argument("--tokenizer", default=None, metavar="hf:PATH",
                   help="encode with this local transformers model's tokenizer.json, in the model's own ids, "
                        "instead of training sentencepiece (docs/data.md)")
    p.add_argument("--no-progress", action="store_true", help="never show progress bars")
    p.set_defaults(func=_prepare)

    d = sub.add_parser(
        "demo-corpus", help="write the built-in demo corpus (no download needed)",
        description="Write a small multi-domain corpus built offline from the Python standard library "
                    "(source code, docstrings, bytecode listings, the Unicode table, the reference "
                    "manual) and generated text (arithmetic, word problems), in the layout "
                    "'btm data prepare' reads. Domains and licences: docs/data.md.",
    )
    d.add_argument("out_dir", metavar="OUT_DIR", help="directory to write OUT_DIR/<domain>/{train,valid,test}.jsonl into")
    d.add_argument("--size", type=int, default=1_000_000, help="characters per domain, about bytes (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seed of the generated domains and the splits (default: %(default)s)")
    d.set_defaults(func=_demo_corpus)
