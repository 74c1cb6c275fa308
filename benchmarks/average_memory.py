"""Peak memory of merging: btm's streamed merge methods vs loading every expert.

For N random experts of one size (and a random base for the methods that need one), each
measurement runs in a fresh subprocess and reports (peak RSS - RSS before merging) / (one
expert's file size). btm's merges (``fairseq_ext.merging.merge_checkpoints``; "linear" is
``average_checkpoints``) hold the output model plus a few tensors of the largest parameter's
size, so the ratio should stay below 2.5 and flat in N. The baseline in the same run is the
naive average: ``torch.load`` all N checkpoints, then average.

The forest's MoE (``fairseq_ext.moe.build.build_moe``, uniform weights) is measured too:
``moe`` starts the router from zero, ``moe-data`` from data (each expert reads the first
``ROUTER_SAMPLE_TOKENS`` tokens of its own random domain). A MoE holds N experts' FFNs, so its
own size grows with N; its columns are followed by a ``-out`` column, (peak RSS - RSS before -
the MoE's file size) / one expert's file size, the streaming overhead that must stay flat in N.

    python benchmarks/average_memory.py [--layers 4 --dim 768 --vocab 8000] [--ns 2,8,16]
        [--methods linear,task_arithmetic,ties,dare_ties,dare_linear,model_stock,moe,moe-data]
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
MOE_METHODS = ("moe", "moe-data")
# Tokens each expert reads for the data-started router: two blocks of the experts' 1024
# positions, one batch. Its activations (not N) set the data start's extra memory; the default
# sample (16k tokens, batches of 8) would cost 8x the forward passes for the same point.
ROUTER_SAMPLE_TOKENS = 2048


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


def make_router_data(out: Path, n: int, vocab: int) -> Path:
    """Domains d0.. of ``ROUTER_SAMPLE_TOKENS + 1`` random tokens each (their train split, a
    fairseq mmap dataset) for the data-started router; reused when already in ``out``."""
    import torch
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_int_dtype

    for j in range(n):
        prefix = out / f"d{j}" / "train"
        if prefix.with_suffix(".idx").exists():
            continue
        prefix.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(j)
        builder = MMapIndexedDatasetBuilder(str(prefix) + ".bin", dtype=best_fitting_int_dtype(vocab))
        builder.add_item(torch.randint(4, vocab, (ROUTER_SAMPLE_TOKENS + 1,), generator=g))
        builder.finalize(str(prefix) + ".idx")
    return out


def build_forest_moe(method: str, paths: list[str], out: str) -> None:
    """The MoE of ``paths`` (uniform weights), its router from zero or from router_data/."""
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from fairseq_ext.moe.router_init import RouterSample

    spec = MoeSpec()
    if method == "moe-data":
        spec = MoeSpec(router_init="data", router_sample=RouterSample(
            str(Path(paths[0]).parent / "router_data"), [f"d{j}" for j in range(len(paths))],
            max_tokens=ROUTER_SAMPLE_TOKENS))
    build_moe({f"e{j}": p for j, p in enumerate(paths)}, out, spec)


def child(method: str, paths: list[str], out: str) -> None:
    import torch

    from fairseq_ext.averaging import average_checkpoints
    from fairseq_ext.merging import get_method, merge_checkpoints
    from fairseq_ext.registry import register_all

    register_all()
    if method in MOE_METHODS:  # build_moe's own imports, so that they count in "before"
        # The output check builds the MoE on the meta device, whose random init imports
        # torch._dynamo (and sympy): about 67 MiB of code, the same for every model and N.
        import torch._dynamo  # noqa: F401

        import fairseq_ext.merging.mapped  # noqa: F401
        import fairseq_ext.moe.build  # noqa: F401
        import fairseq_ext.moe.model  # noqa: F401
        import fairseq_ext.moe.router_init  # noqa: F401
        import fairseq_ext.streams  # noqa: F401
    before = _rss_kib("VmRSS")
    # VmHWM cannot be reset portably; clear_refs '5' resets it on Linux.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if method in MOE_METHODS:
        build_forest_moe(method, paths, out)
    elif method == "linear":
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
    methods = [*args.methods.split(","), "naive"]
    with (contextlib.nullcontext(args.workdir) if args.workdir
          else tempfile.TemporaryDirectory()) as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        paths = make_experts(tmp, max(ns), args.layers, args.dim, args.vocab)
        if "moe-data" in methods:
            make_router_data(tmp / "router_data", max(ns), args.vocab)
        size = paths[0].stat().st_size
        print(f"expert: {args.layers} layers x {args.dim} dim, vocab {args.vocab}, "
              f"file {size / 2**20:.1f} MiB; load average {os.getloadavg()[0]:.1f}")
        columns = [c for m in methods for c in ([m, f"{m}-out"] if m in MOE_METHODS else [m])]
        if any(m in MOE_METHODS for m in methods):
            columns.append("MoE file")
        print(f"{'N':>3} " + " ".join(f"{c:>15}" for c in columns) + "   (peak RSS / expert)")
        for n in ns:
            row, moe_file = [], None
            for method in methods:
                out = tmp / f"out_{method}.pt"
                row.append(measure_once(method, out, paths[:n]) / size)
                if method in MOE_METHODS:
                    moe_file = out.stat().st_size / size
                    row.append(row[-1] - moe_file)
            if moe_file is not None:
                row.append(moe_file)
            print(f"{n:>3} " + " ".join(f"{x:>15.2f}" for x in row), flush=True)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


def measure_once(method: str, out: Path, paths: list[Path]) -> int:
    """Peak RSS - RSS before, in bytes, of ``method`` over ``paths`` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(out), *map(str, paths)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{method} at N = {len(paths)} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return (r["peak_kib"] - r["before_kib"]) * 1024


if __name__ == "__main__":
    main()
