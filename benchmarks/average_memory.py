"""Peak memory of merging: btm's streamed merge methods vs loading every expert.

For N random experts of one size (and a random base for the methods that need one), each
measurement runs in a fresh subprocess and reports (peak RSS - RSS before merging) / (one
expert's file size). btm's merges (``fairseq_ext.merging.merge_checkpoints``; "linear" is
``average_checkpoints``) hold the output model plus a few tensors of the largest parameter's
size, so the ratio should stay below 2.5 and flat in N. The baseline in the same run is the
naive average: ``torch.load`` all N checkpoints, then average.

    python benchmarks/average_memory.py [--layers 4 --dim 768 --vocab 8000] [--ns 2,8,16]
        [--methods linear,task_arithmetic,ties,dare_ties,dare_linear,model_stock]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def make_experts(out: Path, n: int, layers: int, dim: int, vocab: int) -> list[Path]:
    """``n`` experts e0.pt.. and a base base.pt, random, reused when already in ``out``."""
    import torch
    from fairseq.data import Dictionary

    from fairseq_ext import checkpoint as ck
    from fairseq_ext.models.elm import ElmConfig
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig

    d = Dictionary()
    for i in range(vocab - 4):
        d.add_symbol(f"w{i}")
    cfg = ElmConfig(decoder_layers=layers, decoder_embed_dim=dim, decoder_attention_heads=12,
                    decoder_ffn_embed_dim=4 * dim, max_target_positions=1024)
    cfg._name = "elm_125m"
    paths = []
    model = ck.build_model_from_cfg({**cfg.__dict__, "_name": "elm_125m"}, d)
    mcfg = ck.make_cfg(cfg, MultidomainLMConfig(data="none"))
    for i in [*range(n), "base"]:
        p = out / (f"e{i}.pt" if i != "base" else "base.pt")
        if not p.exists():
            torch.manual_seed(i if i != "base" else 10_000)
            for prm in model.parameters():
                prm.data.normal_(0, 0.02)
            ck.save_checkpoint(ck.make_state(model.state_dict(), mcfg, d), p)
        paths.append(p)
    return paths[:-1]


def child(method: str, paths: list[str], out: str) -> None:
    import torch

    from fairseq_ext.averaging import average_checkpoints
    from fairseq_ext.merging import get_method, merge_checkpoints
    from fairseq_ext.registry import register_all

    register_all()
    before = _rss_kib("VmRSS")
    # VmHWM cannot be reset portably; clear_refs '5' resets it on Linux.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if method == "linear":
        average_checkpoints(paths, [1.0] * len(paths), out)
    elif method != "naive":
        base = str(Path(paths[0]).parent / "base.pt") if get_method(method).needs_base else None
        merge_checkpoints(paths, [1.0] * len(paths), out, method=method, base=base)
    else:
        states = [torch.load(p, map_location="cpu", weights_only=True)["model"] for p in paths]
        avg = {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}
        torch.save(avg, out)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"before_kib": before, "peak_kib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--ns", default="2,8,16")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,dare_linear,model_stock")
    ap.add_argument("--workdir", default=None, help="keep the experts here and reuse them (default: a temp dir)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, out, *paths = args.child
        return child(method, paths, out)

    sys.path.insert(0, str(REPO))
    ns = [int(x) for x in args.ns.split(",")]
    with (contextlib.nullcontext(args.workdir) if args.workdir
          else tempfile.TemporaryDirectory()) as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        paths = make_experts(tmp, max(ns), args.layers, args.dim, args.vocab)
        size = paths[0].stat().st_size
        print(f"expert: {args.layers} layers x {args.dim} dim, vocab {args.vocab}, "
              f"file {size / 2**20:.1f} MiB; load average {os.getloadavg()[0]:.1f}")
        methods = [*args.methods.split(","), "naive"]
        print(f"{'N':>3} " + " ".join(f"{m:>15}" for m in methods) + "   (peak RSS / expert)")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for n in ns:
            row = []
            for method in methods:
                proc = subprocess.run([sys.executable, __file__, "--child", method,
                                       str(tmp / f"out_{method}.pt"), *map(str, paths[:n])],
                                      env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{method} at N = {n} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                row.append((r["peak_kib"] - r["before_kib"]) * 1024 / size)
            print(f"{n:>3} " + " ".join(f"{x:>15.2f}" for x in row), flush=True)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
