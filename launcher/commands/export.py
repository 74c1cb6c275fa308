"""btm verbs: ``btm export hf SOURCE OUT_DIR`` (Hugging Face transformers directories)."""
from __future__ import annotations

from launcher.contract.errors import BtmError


def _export_hf(args) -> int:
    import logging

    for name in ("filelock", "fairseq.tasks.text_to_speech"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from fairseq_ext.export_hf import export_hf  # heavy: torch, safetensors, tokenizers

    record = export_hf(args.source, args.out_dir, data_dir=args.data_dir,
                       trust_pickle=args.trust_checkpoint)
    if "experts" in record:
        print(f"exported forest {args.source} to {args.out_dir}: "
              f"{len(record['experts'])} experts ({', '.join(record['experts'])})"
              + (f", {len(record.get('priors', []))} cached priors" if record.get("priors") else ""))
    else:
        print(f"exported {args.source} to {args.out_dir} (vocab {record['vocab_size']}, "
              f"model.safetensors sha256 {record['model_safetensors_sha256'][:12]})")
    return 0


def _no_subcommand(args) -> int:
    raise BtmError("'btm export' needs a sub-command: btm export hf SOURCE OUT_DIR (see btm export --help)")


def register(subparsers) -> None:
    export = subparsers.add_parser("export", help="export models to other toolkits",
                                   description="Export btm checkpoints and forests (see docs/export.md).")
    export.set_defaults(func=_no_subcommand)
    sub = export.add_subparsers(dest="export_command", metavar="SUBCOMMAND")
    p = sub.add_parser(
        "hf", help="write Hugging Face transformers directories (GPT-2 + fast tokenizer)",
        description="Export SOURCE as Hugging Face transformers GPT2LMHeadModel directories "
                    "(config.json, model.safetensors, tokenizer.json) that "
                    "AutoModelForCausalLM/AutoTokenizer.from_pretrained load without "
                    "trust_remote_code. SOURCE is one checkpoint (expert, seed, dense model or "
                    "parameter average) -> OUT_DIR is one model; or a forest (a run dir or its "
                    "forest.json, or a directory of <expert>.pt files) -> OUT_DIR/<expert>/ per "
                    "expert plus the manifest and cached priors. Re-running skips experts "
                    "already exported from the same checkpoint bytes.")
    p.add_argument("source", metavar="SOURCE", help="checkpoint file, run dir, forest.json or directory of *.pt")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created)")
    p.add_argument("--data-dir", default=None,
                   help="the 'btm data prepare' dir holding spm.model/dict.txt (default: the "
                        "checkpoint's cfg.task.data)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need pickle to load (only for files you trust)")
    p.set_defaults(func=_export_hf)
