"""btm verbs: seed, branch, train (the model side of one BTM iteration).

    btm seed   --data DATA --domains a,b,c --preset tiny --updates 150 --save-dir RUN/seed
    btm branch --out RUN/experts/a/init.pt --from-seed RUN/seed/checkpoint_best.pt
    btm train  --data DATA --domain a --init RUN/experts/a/init.pt --save-dir RUN/experts/a

Each prints a JSON summary on stdout. ``seed`` and ``train`` resume from
``SAVE_DIR/checkpoint_last.pt``; on SIGUSR2/SIGTERM they save and exit with status 3
(``PREEMPTED_EXIT``) so the executor requeues them. ``--nproc-per-node N`` trains on N
processes of this node (torchrun, one per GPU) and keeps that contract
(fairseq_ext/multiproc.py); started by torchrun directly, each rank runs the trainer and
only rank 0 prints. fairseq and torch are imported inside the handlers, so ``btm --help``
works without them.
"""
from __future__ import annotations

import json
import os
import sys

from launcher.contract.errors import PREEMPTED_EXIT, BtmError, shown


def _domains(text: str, flag: str) -> list[str]:
    from launcher.contract.names import validate_name

    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names:
        raise BtmError(f"{flag} needs at least one domain name")
    return [validate_name(d, "domain") for d in names]


def _floats(text: str | None, flag: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise BtmError(f"{flag} must be comma-separated numbers, got {shown(text)}") from None


def _add_training_flags(p, *, default_interval: int = 100) -> None:
    p.add_argument("--data", required=True, help="prepared data dir (dict.txt, <domain>/<split>.bin|idx)")
    p.add_argument("--save-dir", required=True, help="where checkpoint_last/best.pt and train_log.jsonl go")
    p.add_argument("--preset", default="tiny", help="model preset (tiny, 125m, 350m, 750m, 1.3b)")
    p.add_argument("--save-interval-updates", type=int, default=default_interval,
                   help="save checkpoint_last and validate every N updates (default %(default)s)")
    p.add_argument("--tokens-per-batch", type=int, default=None,
                   help="tokens per update over all GPUs (default: preset's per-GPU batch x GPUs)")
    p.add_argument("--update-freq", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: preset's)")
    p.add_argument("--seed", type=int, default=1, help="random seed (init, data order)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 on capable GPUs, fp32 on CPU")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the model on GPU")
    p.add_argument("--valid-max-tokens", type=int, default=None,
                   help="validate on at most this many tokens per domain")
    p.add_argument("--log-interval", type=int, default=10, help="updates between train_log rows")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write train_log's scalars as TensorBoard event files in SAVE_DIR/tensorboard "
                        "(view: tensorboard --logdir SAVE_DIR; needs `pip install tensorboard`)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="train on N processes of this node, one per GPU (torchrun; gloo on CPU)")
    p.add_argument("--nodes", type=int, default=1,
                   help="inside a SLURM job of N nodes: train on all of them, --nproc-per-node ranks each "
                        "(srun tasks; NCCL on GPU, gloo on CPU)")


def _spec_from_args(args, domains, weights, temperature, init, updates):
    from fairseq_ext.train import TrainSpec

    return TrainSpec(
        data_dir=args.data, domains=domains, save_dir=args.save_dir, preset=args.preset,
        domain_weights=weights, temperature=temperature, init=init, max_updates=updates,
        save_interval_updates=args.save_interval_updates, tokens_per_batch=args.tokens_per_batch,
        update_freq=args.update_freq, lr=args.lr, seed=args.seed, device=args.device,
        precision=args.precision, compile=False if args.no_compile else None,
        valid_max_tokens=args.valid_max_tokens, log_interval=args.log_interval,
        trust_init=getattr(args, "trust_checkpoint", False), tensorboard=args.tensorboard)


def _run_training(spec, nproc: int = 1, nodes: int = 1) -> int:
    """Train through the stages' one trainer call; print the result; 3 when preempted."""
    from dataclasses import asdict

    from fairseq_ext.train import end_process_group
    from launcher.stages.training import train_model

    result = train_model(spec, nproc, nodes)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(asdict(result), indent=2, sort_keys=True), flush=True)
    if nproc == 1 and nodes == 1:  # after rank 0's print: a rank that exits 3 gets torchrun to kill the rest
        end_process_group()
    if result.preempted:
        print("btm: preempted; checkpoint_last saved, run again to resume", file=sys.stderr)
        return PREEMPTED_EXIT
    return 0


def _seed(args) -> int:
    from launcher.contract.presets import get_preset
    from launcher.stages.training import domain_mixture

    preset = get_preset(args.preset)
    if args.updates is not None and args.fraction is not None:
        raise BtmError("give --updates or --fraction, not both")
    if args.fraction is not None:
        if not 0.0 <= args.fraction <= 1.0:
            raise BtmError(f"--fraction must be in [0, 1], got {args.fraction}")
        updates = round(args.fraction * preset.total_updates)
    else:
        updates = preset.seed_updates if args.updates is None else args.updates
    domains = _domains(args.domains, "--domains")
    # Balanced mix: every training domain gets the same share of the seed's batches (the
    # pipeline's seed stage with its default data.mixture).
    weights, temperature = domain_mixture("balanced", len(domains))
    spec = _spec_from_args(args, domains, weights, temperature, None, updates)
    return _run_training(spec, args.nproc_per_node, args.nodes)


def _train(args) -> int:
    domains = _domains(args.domain, "--domain")
    weights = _floats(args.weights, "--weights")
    spec = _spec_from_args(args, domains, weights, args.temperature, args.init, args.updates)
    return _run_training(spec, args.nproc_per_node, args.nodes)


def _parse_parents(text: str) -> dict[str, float]:
    parents = {}
    for item in text.split(","):
        path, sep, weight = item.rpartition("=")
        if not sep or not path:
            raise BtmError(f"--parents items look like path=weight, got {shown(item)}")
        try:
            parents[path] = float(weight)
        except ValueError:
            raise BtmError(f"--parents: weight of {path} is not a number: {shown(weight)}") from None
    return parents


def _branch(args) -> int:
    from fairseq_ext.branch import branch_expert, posterior_parents

    chosen = [x for x in (args.from_seed, args.from_, args.parents) if x] + ([1] if args.posterior else [])
    if len(chosen) != 1:
        raise BtmError("give exactly one of --from-seed, --from, --parents, --posterior")
    if args.posterior:
        if not (args.experts and args.domain and args.data):
            raise BtmError("--posterior needs --experts, --domain and --data")
        experts = [e for e in args.experts.split(",") if e]
        parents = posterior_parents(experts, args.data, args.domain, top_k=args.top_k)
        method, info = "posterior", {"domain": args.domain, "top_k": args.top_k}
    elif args.parents:
        parents, method, info = _parse_parents(args.parents), "explicit", {}
    else:
        parents = {args.from_seed or args.from_: 1.0}
        method, info = ("seed" if args.from_seed else "copy"), {}
    record = branch_expert(parents, args.out, method=method, info=info, trust_pickle=args.trust_checkpoint)
    print(json.dumps(record, indent=2, sort_keys=True))
    return 0


def register(subparsers):
    p = subparsers.add_parser(
        "seed", help="train the seed LM on a balanced mix of the training domains",
        description="Train the seed LM (BTM step 0) on an equal-weight mix of --domains. "
                    "--updates 0 (or --fraction 0) writes a randomly initialized checkpoint, "
                    "so experts branched from it start from scratch.")
    _add_training_flags(p)
    p.add_argument("--domains", required=True, help="comma-separated training domains")
    p.add_argument("--updates", type=int, default=None, help="updates (default: preset's seed_updates)")
    p.add_argument("--fraction", type=float, default=None,
                   help="updates as a fraction of the preset's total_updates")
    p.set_defaults(func=_seed)

    p = subparsers.add_parser(
        "branch", help="write a new expert's init checkpoint from the seed or weighted parents",
        description="Write OUT (fresh checkpoint: parameters only, update 0) and branch.json "
                    "in its directory. Parents: the seed, one checkpoint, explicit weights, or "
                    "the posterior of the new domain over existing experts.")
    p.add_argument("--out", required=True, help="output checkpoint, e.g. RUN/experts/X/init.pt")
    p.add_argument("--from-seed", help="copy the seed LM checkpoint")
    p.add_argument("--from", dest="from_", help="copy this checkpoint")
    p.add_argument("--parents", help="weighted average: a.pt=0.3,b.pt=0.7 (weights normalized)")
    p.add_argument("--posterior", action="store_true",
                   help="weights = posterior of --domain's data over --experts (top-k)")
    p.add_argument("--experts", help="comma-separated expert checkpoints (for --posterior)")
    p.add_argument("--domain", help="the new domain (for --posterior)")
    p.add_argument("--data", help="prepared data dir (for --posterior)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely parents")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow parent checkpoints that need pickle (only for files you trust); "
                        "OUT is always a weights_only checkpoint, so this converts them")
    p.set_defaults(func=_branch)

    p = subparsers.add_parser(
        "train", help="train one expert (or the dense baseline) from an init checkpoint",
        description="Train on --domain (a comma list gives a mixture, e.g. the dense baseline) "
                    "from --init (or random init without it). Resumes from "
                    "SAVE_DIR/checkpoint_last.pt; exits 3 after saving on SIGUSR2/SIGTERM.")
    _add_training_flags(p)
    p.add_argument("--domain", required=True, help="training domain(s), comma-separated")
    p.add_argument("--init", default=None, help="initial checkpoint (from `btm branch`)")
    p.add_argument("--updates", type=int, default=None, help="updates (default: preset's total_updates)")
    p.add_argument("--weights", default=None, help="mixture weights, one per --domain")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="mixture p_i ∝ n_i^(1/T) when no --weights")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow an --init checkpoint that needs pickle (only for files you trust)")
    p.set_defaults(func=_train)
