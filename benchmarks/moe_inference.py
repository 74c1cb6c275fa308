"""Inference cost of the forest's MoE (stage moe) against one expert and the full ensemble,
measured in the same run on the same batches, with the eval stage's own timing
(fairseq_ext/moe/speed.py, which `btm report` shows from a few short passes over evaluation
data); this script runs longer passes over random blocks.

Forward passes (no gradients) over ``--batches`` batches of ``--batch-size`` sequences of the
model's positions; each model is timed ``--repeats`` times, interleaved, and the median
tokens/s is reported with its ratio to one expert's. On the CPU the time is the process's CPU
time (``time.process_time``; run with ``OMP_NUM_THREADS=1``), so that a neighbour's load does
not decide the ratio; on a GPU it is wall time after a synchronize. The load average at start
and end is printed beside it. The full ensemble runs every expert on
the same batch (what `ensemble_*` costs per token). Either a run directory (its
``moe/checkpoint_last.pt`` and forest.json experts) or ``--synthetic PRESET`` (random experts
of that preset built into a temporary directory, then built into a MoE with ``--top-k``).

    python benchmarks/moe_inference.py --run-dir RUN [--device cuda] [--batches 20]
    python benchmarks/moe_inference.py --synthetic llama-tiny --experts 4 --top-k 2

Prints one JSON object: device, clock, load average, tokens per batch, per model
{tokens_per_s, ratio_to_expert}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic_forest(out: Path, preset: str, n: int, top_k: int) -> tuple[Path, list[Path]]:
    """``n`` random experts of ``preset`` and their MoE (uniform weights, zero router)."""
    import torch
    from fairseq.data import Dictionary

    from fairseq_ext import checkpoint as ck
    from fairseq_ext.models.preset_config import model_config_for_preset
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig
    from launcher.contract.presets import PRESETS

    d = Dictionary()
    for i in range(8000 - 4):
        d.add_symbol(f"w{i}")
    cfg = model_config_for_preset(preset)
    cfg._name = PRESETS[preset].arch
    full = ck.make_cfg(cfg, MultidomainLMConfig(data="none"))
    experts = {}
    for j in range(n):
        torch.manual_seed(j)
        model = ck.build_model_from_cfg(full["model"], d)
        experts[f"e{j}"] = out / f"e{j}.pt"
        ck.save_checkpoint(ck.make_state(model.state_dict(), full, d), experts[f"e{j}"])
    build_moe(experts, out / "moe.pt", MoeSpec(top_k=top_k))
    return out / "moe.pt", list(experts.values())


def run_forest(run_dir: Path) -> tuple[Path, list[Path]]:
    from launcher.contract.forest import verified_checkpoints
    from launcher.contract.layout import MOE, RunLayout

    layout = RunLayout(run_dir)
    return layout.checkpoint(MOE), list(verified_checkpoints(layout.forest).values())


def measure(moe: Path, experts: list[Path], device: str, batches: int, batch_size: int,
            repeats: int) -> dict:
    """The eval stage's timing (fairseq_ext/moe/speed.py) on random blocks of full length."""
    import torch

    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.moe.speed import clock_name, speed_rows, time_models

    expert_models = [load_model(p, device).model for p in experts]
    moe_model = load_model(moe, device).model
    positions = moe_model.max_positions()
    vocab = moe_model.decoder.embed_tokens.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(4, vocab, (batch_size, positions), generator=g).to(device)
            for _ in range(batches)]
    load_start = os.getloadavg()
    seconds = time_models({"expert": expert_models[:1], "moe": [moe_model], "ensemble": expert_models},
                          data, device, repeats)
    rows = speed_rows(seconds, batches * batch_size * positions, "expert")
    return {"device": device, "clock": clock_name(device),
            "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
            "tokens_per_repeat": rows[0]["tokens"], "experts": len(experts),
            "top_k": int(moe_model.decoder.cfg.moe_top_k),
            "models": {r["model"]: {"tokens_per_s": round(r["tokens_per_s"], 1),
                                    "ratio_to_expert": round(r["ratio_to_expert"], 3)} for r in rows}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", type=Path, help="a run whose moe stage is done")
    src.add_argument("--synthetic", metavar="PRESET", help="random experts of this preset")
    ap.add_argument("--experts", type=int, default=4, help="--synthetic: number of experts")
    ap.add_argument("--top-k", type=int, default=2, help="--synthetic: experts per token")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from fairseq_ext.registry import register_all

    register_all()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run_dir:
            moe, experts = run_forest(args.run_dir)
        else:
            moe, experts = synthetic_forest(Path(tmp), args.synthetic, args.experts, args.top_k)
        result = measure(moe, experts, args.device, args.batches, args.batch_size, args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
