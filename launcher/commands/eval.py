"""btm verbs: eval (score once, then mix every method) and average (parameter averaging).

Both read the forest from RUN_DIR/forest.json unless ``--experts name=path,...`` is given,
cache per-token scores in RUN_DIR/scores/ and priors in RUN_DIR/priors/, and append rows to
RUN_DIR/results/results.{csv,parquet}, through the same launcher functions as the eval stage
(launcher/stages/evaluation.py). torch and fairseq are imported inside the handlers.
"""
from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from launcher.contract import methods as registry
from launcher.contract.errors import BtmError, shown
from launcher.contract.layout import RunLayout
from launcher.contract.names import validate_name

# btm average --method values that are the linear average's weightings (average_<weights>).
AVERAGE_WEIGHTS = tuple(registry.merge_parts(m.name)[1] for m in registry.METHODS if m.kind == "average")


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="the run directory (results go to RUN_DIR/results/)")
    p.add_argument("--experts", metavar="NAME=PATH,...",
                   help="the forest's experts (default: read RUN_DIR/forest.json)")
    p.add_argument("--data", type=Path, metavar="DIR", help="prepared data dir (default: RUN_DIR/data)")
    p.add_argument("--run-name", help="value of the results' 'run' column (default: RUN_DIR's name)")
    g = p.add_argument_group("domain prior (EWMA of batch posteriors on held-out data)")
    g.add_argument("--prior-split", default="valid", help="held-out split for the prior (default: valid)")
    g.add_argument("--prior-alpha", type=float, default=0.3, help="EWMA weight of each batch (default: 0.3)")
    g.add_argument("--prior-batches", type=int, default=None,
                   help="number of held-out batches to use (default: all)")
    g.add_argument("--prior-batch-docs", type=int, default=2,
                   help="documents (or blocks, with --prior-estimator block_end) per batch (default: 2)")
    g.add_argument("--prior-estimator", choices=("document", "block_end"), default="document",
                   help="document: a batch's posterior is the mean whole-document Bayes posterior; "
                        "block_end: DEMix's released estimator, the previous-token posterior at the "
                        "end of each block (docs/evaluation.md) (default: document)")
    g.add_argument("--prior-block-tokens", type=int, default=1024,
                   help="tokens per block of the block_end estimator (default: 1024, DEMix's)")
    g.add_argument("--prior-temperature", type=float, action="append", metavar="T",
                   help="temper the prior as prior**(1/T); repeat to choose the T whose fixed-prior "
                        "ensemble has the lowest nll on the prior split (default: 1, 3, 10, 30, 100; "
                        "one --prior-temperature 1: untempered)")
    g = p.add_argument_group("scoring")
    g.add_argument("--split", default="test", help="split to report (default: test)")
    g.add_argument("--tokens-per-sample", type=int, default=None,
                   help="tokens per model input, context included (default: the model's positions)")
    g.add_argument("--context-window", type=int, default=0,
                   help="earlier tokens fed before each block, as fairseq-eval-lm (default: 0)")
    g.add_argument("--no-doc-reset", action="store_true",
                   help="let context cross document boundaries (fairseq-eval-lm's break mode none)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow expert/model checkpoints that need pickle to load (only for files you "
                        "trust); without it they are refused")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a forest: experts, ensembles, top-k (scores once, then mixes)",
        description="Score every expert on each eval domain once (cached in RUN_DIR/scores), "
                    "estimate each domain's prior on held-out data (cached in RUN_DIR/priors), "
                    "then mix for every method and k; rows go to RUN_DIR/results/. Re-running "
                    "with other methods, k or prior settings costs only mixing.")
    _add_common(p)
    p.add_argument("--domains", type=_csv, metavar="D1,D2",
                   help="eval domains (default: the run config's domains.eval, else every domain "
                        "in the data manifest)")
    p.add_argument("--methods", type=_csv, default=list(registry.FOREST_MIXES), metavar="M1,M2",
                   help=f"methods (default: {', '.join(registry.FOREST_MIXES)}): {', '.join(registry.MIXES)} "
                        "(c-BTM routes with RUN_DIR/clusters/model); parameter averages and merges "
                        "with default parameters: average_*, merge_<method>_<uniform|posterior> "
                        "(btm average sets their parameters)")
    p.add_argument("--top-k", type=_ints, default=[1], metavar="K1,K2",
                   help="k values for top-k and c-BTM (default: 1)")
    p.add_argument("--model", action="append", default=[], metavar="METHOD=PATH",
                   help="also score a single model as METHOD, e.g. dense=RUN/dense/checkpoint_best.pt; "
                        "moe=RUN/moe/checkpoint_last.pt also files its routing table")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser(
        "average", help="average or merge the experts' parameters and score the model",
        description="Weighted parameter average of the forest's experts, with weights from the "
                    "target domain's cached prior (argmax: the top expert only; posterior: the "
                    "prior itself; uniform: 1/N), or a merge of their task vectors (--method "
                    f"{'|'.join(registry.MERGE_LABELS)} --weights uniform|posterior; "
                    "docs/merging.md). Written to RUN_DIR/averages/<name>/ as a "
                    "fairseq checkpoint + safetensors, then scored on the eval domains.")
    _add_common(p)
    p.add_argument("--method", required=True, metavar="|".join([*AVERAGE_WEIGHTS, *registry.MERGE_LABELS]),
                   help="a linear average's weights (uniform, argmax, posterior), or a merge method")
    g = p.add_argument_group("merge methods (docs/merging.md)")
    g.add_argument("--weights", choices=registry.MERGE_WEIGHTINGS,
                   help="the merge's expert weights: the target domain's prior, or 1/N (required)")
    g.add_argument("--density", type=float, help="fraction of each task vector kept (ties, dare_*)")
    g.add_argument("--lambda", dest="lambda_", type=float, metavar="LAMBDA", help="scale of the merged task vector")
    g.add_argument("--seed", type=int, default=0, help="seed of DARE's random drop (default: 0)")
    g.add_argument("--base", type=Path, metavar="CHECKPOINT",
                   help="base of the task vectors (default: the experts' recorded parent, branch.json)")
    p.add_argument("--target-domain", help="domain whose prior gives the weights (argmax, posterior)")
    p.add_argument("--eval-domains", type=_csv, metavar="D1,D2",
                   help="domains to score the average on (default: the target domain)")
    p.add_argument("--name", help="directory name under RUN_DIR/averages/ (default: METHOD.TARGET, "
                                  "METHOD_WEIGHTS.TARGET for a merge)")
    p.set_defaults(func=run_average)


def _settings(args, **extra):
    from fairseq_ext.evaluate import EvalSettings
    from fairseq_ext.priors import PriorSettings
    from fairseq_ext.scoring import ContextSettings

    for opt, value in (("--batch-size", args.batch_size), ("--prior-batch-docs", args.prior_batch_docs)):
        if value < 1:
            raise BtmError(f"{opt} must be at least 1, got {value}")
    prior = PriorSettings(split=args.prior_split, alpha=args.prior_alpha, n_batches=args.prior_batches,
                          batch_docs=args.prior_batch_docs, estimator=args.prior_estimator,
                          block_tokens=args.prior_block_tokens,
                          temperatures=tuple(args.prior_temperature or registry.PRIOR_TEMPERATURES)).validate()
    context = ContextSettings(tokens_per_sample=args.tokens_per_sample, context_window=args.context_window,
                              reset_at_doc=not args.no_doc_reset).validate()
    return EvalSettings(prior=prior, context=context, split=args.split, device=args.device,
                        batch_size=args.batch_size, trust_checkpoint=args.trust_checkpoint, **extra)


def parse_experts(text: str) -> dict[str, Path]:
    """``name=path,name=path`` (the ``--experts`` option) -> {name: path}."""
    experts: dict[str, Path] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise BtmError(f"--experts: expected name=path, got {shown(item)}")
        validate_name(name, "expert name")
        if name in experts:
            raise BtmError(f"--experts: expert {shown(name)} is given twice")
        experts[name] = Path(path)
    if not experts:
        raise BtmError("--experts: no experts given")
    return experts


def _experts(args) -> dict:
    from launcher.contract.forest import verified_checkpoints

    return parse_experts(args.experts) if args.experts else verified_checkpoints(RunLayout(args.run_dir).forest)


def _data_dir(args) -> Path:
    return args.data or RunLayout(args.run_dir).data


def _print_rows(rows) -> None:
    cols = ["method", "k", "eval_domain", "split", "tokens", "ppl", "expert_forward_passes"]
    print(rows[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))


def _methods(names: list[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(registry.canonical(n) for n in names))
    for name in out:
        if name not in registry.MIXES and registry.get_method(name).kind not in ("average", "merge"):
            raise BtmError(f"--methods: {shown(name)} is not evaluated by btm eval (known: {', '.join(registry.MIXES)}, "
                           "average_*, merge_*)")
    return out


def run_eval(args) -> int:
    from launcher.stages.evaluation import evaluate_merges, evaluate_mixes, evaluate_model, evaluate_moe

    layout = RunLayout(args.run_dir)
    methods = _methods(args.methods)
    mixes = tuple(m for m in methods if m in registry.MIXES)
    settings = _settings(args, methods=mixes, top_k=tuple(args.top_k))
    domains = args.domains or _config_eval_domains(args.run_dir) or _manifest_domains(_data_dir(args))
    where = dict(name=args.run_name, data_dir=args.data)
    experts = _experts(args)
    if mixes:
        _print_rows(evaluate_mixes(layout, experts, domains, settings, **where))
    for rows in evaluate_merges(layout, experts, list(methods), domains, settings, **where):
        _print_rows(rows)
    for item in args.model:
        method, sep, path = item.partition("=")
        if not sep or not path:
            raise BtmError(f"--model: expected METHOD=PATH, got {shown(item)}")
        if method == "moe":  # k = its top_k, and its routing table (slots named as the forest)
            _print_rows(evaluate_moe(layout, Path(path), experts, domains, settings, **where))
        else:
            _print_rows(evaluate_model(layout, method, Path(path), domains, settings, **where))
    print(f"results: {layout.results / 'results.csv'}")
    return 0


def _merge_spec(args):
    """(weights rule, MergeSpec) of ``btm average``'s --method/--weights and merge options."""
    from fairseq_ext.evaluate import MergeSpec

    params = {k: v for k, v in (("density", args.density), ("lambda", args.lambda_)) if v is not None}
    if args.method in AVERAGE_WEIGHTS:
        given = [opt for opt, v in (("--weights", args.weights), ("--density", args.density),
                                    ("--lambda", args.lambda_), ("--base", args.base)) if v is not None]
        if given:
            raise BtmError(f"{', '.join(given)}: only for merge methods ({', '.join(registry.MERGE_LABELS)}); "
                           f"--method {args.method} is the linear average with {args.method} weights")
        return args.method, MergeSpec()
    if args.method not in registry.MERGE_LABELS:
        known = [*AVERAGE_WEIGHTS, *registry.MERGE_LABELS]
        close = difflib.get_close_matches(args.method, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BtmError(f"--method: unknown method {shown(args.method)}{hint} (known: {', '.join(known)})")
    if args.weights is None:
        raise BtmError(f"--method {args.method} needs --weights ({' or '.join(registry.MERGE_WEIGHTINGS)})")
    return args.weights, MergeSpec(method=args.method, params=params, seed=args.seed, base=args.base)


def run_average(args) -> int:
    from launcher.stages.evaluation import evaluate_average

    rule, merge = _merge_spec(args)
    settings = _settings(args)
    experts = _experts(args)
    domains = args.eval_domains or ([args.target_domain] if args.target_domain else [])
    record, rows = evaluate_average(RunLayout(args.run_dir), experts, rule, args.target_domain, domains,
                                    settings, merge=merge, average_name=args.name, name=args.run_name,
                                    data_dir=args.data)
    what = f"merge ({record['merge']['method']})" if record.get("merge") else "average"
    print(f"{what}: {record['checkpoint']} (weights "
          + ", ".join(f"{n}={w:.3f}" for n, w in zip(record["experts"], record["weights"])) + ")")
    _print_rows(rows)
    return 0


def _config_eval_domains(run_dir: Path) -> list[str] | None:
    """A pipeline run's eval domains. Its data manifest also lists the random-split baseline's
    pseudo-domains (random0, ...), which are training shards, not evaluation data."""
    import yaml

    path = RunLayout(run_dir).config
    if not path.is_file():
        return None
    try:
        domains = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("domains", {}).get("eval")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as e:
        raise BtmError(f"cannot read the eval domains of {path}: {e}; give --domains") from None
    return list(domains) if domains else None


def _manifest_domains(data_dir: Path) -> list[str]:
    from launcher.contract.data_manifest import manifest_path, read_data_manifest

    domains = read_data_manifest(data_dir).get("domains")
    if not domains:
        raise BtmError(f"{manifest_path(data_dir)} lists no domains; give --domains")
    return list(domains)
