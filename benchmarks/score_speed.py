"""Scoring throughput, side by side: fairseq-eval-lm vs btm's scorer vs a plain compiled scorer.

One checkpoint (``--checkpoint``, or a random-init one of ``--preset`` written by btm's trainer
with zero updates), one split of one prepared domain, blocks of ``tokens_per_sample`` with no
context window (every token is scored once, by all three), each contender in its own process:

- ``fairseq``: ``fairseq_cli.eval_lm`` (``--fp16`` on GPU, as stock users run it); tokens/s
  from its own "Evaluated N tokens in S s" line (one pass, its first batch included).
- ``btm``: ``fairseq_ext.scoring.forward_logprobs`` (what ``score_split`` runs after its cache
  lookup): bf16 autocast on GPU, fp32 log-softmax.
- ``plain``: the minimal loop below: the same model, ``torch.compile``d on GPU, bf16 autocast,
  fp32 log-softmax and gather over non-overlapping blocks.

btm and plain: one untimed warm-up pass (compilation), then the best of ``--repeats`` passes.
Prints the load average at start and end, tokens/s, ratios and (GPU) peak memory.

    python benchmarks/score_speed.py --data DATA --domain python_code --split train --preset 125m
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _read(a):
    from fairseq_ext.scoring import read_split

    tokens, starts = read_split(a.data, a.domain, a.split)
    return tokens, starts


def _best_pass(run_once, repeats: int, device: str) -> float:
    import torch

    run_once()  # warm-up: compilation, allocator, kernels
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_once()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak(device: str):
    import torch
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def run_btm(a) -> dict:
    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.scoring import ContextSettings, forward_logprobs

    tokens, starts = _read(a)
    loaded = load_model(a.checkpoint, a.device)
    context = ContextSettings(tokens_per_sample=a.tokens_per_sample, context_window=0, reset_at_doc=False)
    seconds = _best_pass(lambda: forward_logprobs(loaded.model, tokens, starts, context, eos=loaded.dictionary.eos(),
                                                  pad=loaded.dictionary.pad(), device=a.device,
                                                  batch_size=a.batch_size), a.repeats, a.device)
    return {"tokens_per_s": len(tokens) / seconds, "peak_mem_mib": _peak(a.device), "tokens": len(tokens)}


def run_plain(a) -> dict:
    """Reference scorer: no framework, compiled model, bf16 on GPU, fp32 log-softmax."""
    import numpy as np
    import torch

    from fairseq_ext.checkpoint import load_model

    tokens, _ = _read(a)
    loaded = load_model(a.checkpoint, a.device)
    dev, T = torch.device(a.device), a.tokens_per_sample
    model = torch.compile(loaded.model) if dev.type == "cuda" else loaded.model
    stream = np.concatenate([[loaded.dictionary.eos()], tokens]).astype(np.int64)
    n_blocks = len(tokens) // T  # whole blocks only: one shape, compiled once
    blocks = torch.from_numpy(stream[:n_blocks * T + 1]).to(dev)
    inputs, targets = blocks[:-1].view(n_blocks, T), blocks[1:].view(n_blocks, T)
    out = torch.empty(n_blocks, T, device=dev)

    def score_all():
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            for i in range(0, n_blocks, a.batch_size):
                logits = model(inputs[i:i + a.batch_size])[0]
                lp = torch.log_softmax(logits.float(), dim=-1)
                out[i:i + a.batch_size] = lp.gather(-1, targets[i:i + a.batch_size].unsqueeze(-1)).squeeze(-1)
        return out.cpu()

    seconds = _best_pass(score_all, a.repeats, a.device)
    return {"tokens_per_s": n_blocks * T / seconds, "peak_mem_mib": _peak(a.device), "tokens": n_blocks * T}


EVAL_LM = """
import sys
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import eval_lm
args = options.parse_args_and_arch(options.get_eval_lm_parser(), sys.argv[1:])
eval_lm.main(convert_namespace_to_omegaconf(args))
"""


def run_fairseq(a) -> dict:
    cmd = [sys.executable, "-c", EVAL_LM, a.data, "--path", a.checkpoint, "--user-dir", str(REPO / "fairseq_ext"),
           "--task", "language_modeling", "--gen-subset", f"{a.domain}/{a.split}",
           "--tokens-per-sample", str(a.tokens_per_sample), "--context-window", "0",
           "--sample-break-mode", "none", "--batch-size", str(a.batch_size), "--no-progress-bar",
           "--fp16" if a.device.startswith("cuda") else "--cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    m = re.search(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)", proc.stdout + proc.stderr)
    if not m:
        raise SystemExit("no 'Evaluated N tokens' line from fairseq eval_lm:\n" + (proc.stdout + proc.stderr)[-3000:])
    return {"tokens_per_s": float(m.group(3)), "peak_mem_mib": None, "tokens": int(m.group(1).replace(",", ""))}


def make_checkpoint(a, out_dir: str) -> str:
    """A random-init checkpoint of the preset, written by btm's trainer (zero updates)."""
    from fairseq_ext.train import TrainSpec, train_lm

    result = train_lm(TrainSpec(data_dir=a.data, domains=[a.domain], save_dir=out_dir, preset=a.preset,
                                max_updates=0, device=a.device, valid_max_tokens=a.tokens_per_sample,
                                compile=False))
    return result.checkpoint_last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared data dir")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--split", default="test", help="split to score (train is the largest)")
    ap.add_argument("--checkpoint", help="checkpoint to score (default: a random-init one of --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens-per-sample", type=int, default=None, help="default: the preset's")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from launcher.contract.presets import get_preset
    from train_speed import load_average  # noqa: E402  (beside this file)

    a.tokens_per_sample = a.tokens_per_sample or get_preset(a.preset).tokens_per_sample
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.only:
        print(json.dumps({"plain": run_plain, "btm": run_btm, "fairseq": run_fairseq}[a.only](a)))
        return
    print(f"load average at start: {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        a.checkpoint = a.checkpoint or make_checkpoint(a, tmp)
        results = {}
        for name in ("fairseq", "btm", "plain"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--only", name, "--checkpoint", a.checkpoint,
                   "--device", a.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"scoring {a.domain}/{a.split} ({results['btm']['tokens']} tokens), preset {a.preset}, "
          f"blocks of {a.tokens_per_sample}, batch {a.batch_size}, device {a.device}")
    print(f"{'scorer':<8} {'tokens/s':>10} {'vs fairseq':>10} {'vs plain':>9} {'peak MiB':>9}")
    for name, r in results.items():
        mem = r["peak_mem_mib"]
        print(f"{name:<8} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / results['fairseq']['tokens_per_s']:>10.2f} "
              f"{r['tokens_per_s'] / results['plain']['tokens_per_s']:>9.2f} {'-' if mem is None else round(mem):>9}")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
