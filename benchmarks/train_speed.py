"""Training throughput, side by side: stock fairseq-train vs btm's trainer vs plain PyTorch.

Same model shape (a preset, GPT-2 layout), same data (one prepared domain), same batch
(sequences x tokens_per_sample), same optimizer settings; each contender runs in its own
subprocess for ``--updates`` updates and its throughput is measured after ``--skip`` warm-up
updates (startup, data loading and compilation excluded):

- ``fairseq``: ``fairseq-train --arch transformer_lm`` configured to the same shape, words/s
  from its ``train_inner`` log lines (``--log-interval``), averaged past the warm-up.
- ``btm``: ``fairseq_ext.train.train_lm`` (the expert trainer), tokens/s from its
  train_log.jsonl rows past the warm-up.
- ``plain``: the minimal PyTorch loop below (same ELM module, full-logits cross-entropy,
  AdamW, clip; ``torch.compile``d and bf16 on GPU) -- the reference for what the hardware does
  without any framework.

Prints the load average at start and end (a ratio measured on a loaded machine is noise: rerun
it when the 1-minute load exceeds the cores), tokens/s, ratios to fairseq and to plain, peak
memory (RSS on CPU, CUDA max allocated on GPU) and, on GPU, MFU: (6 * params + 12 * layers *
dim * tokens_per_sample) FLOPs per token (weights, then attention scores and values, forward
and backward) * tokens/s over the GPU's dense bf16 peak.

    python benchmarks/train_speed.py --data DATA --domain bible --preset tiny --updates 60
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
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min; {os.cpu_count()} cores)"


def flops_per_token(params: int, layers: int, dim: int, tokens_per_sample: int) -> int:
    """Training FLOPs per token: 6 per weight, plus attention's QK^T and AV (PaLM's count)."""
    return 6 * params + 12 * layers * dim * tokens_per_sample


def _peak_mem_mib(device: str) -> float:
    import resource

    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_plain(a) -> dict:
    """Reference loop: no framework, just the model, AdamW, clip and a random block sampler."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from fairseq.data import Dictionary

    from fairseq_ext.checkpoint import build_model_from_cfg
    from fairseq_ext.models.elm import elm_config_for_preset
    from fairseq_ext.streams import read_tokens
    from launcher.contract.presets import get_preset

    p = get_preset(a.preset)
    torch.manual_seed(1)
    dev = torch.device(a.device)
    d = Dictionary.load(os.path.join(a.data, "dict.txt"))
    cfg = elm_config_for_preset(a.preset)
    model = build_model_from_cfg({**cfg.__dict__, "_name": p.arch}, d).to(dev).train()
    forward = torch.compile(model) if dev.type == "cuda" else model
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=p.adam_betas, weight_decay=p.weight_decay,
                            **({"fused": True} if dev.type == "cuda" else {"foreach": True}))
    tokens = torch.from_numpy(np.asarray(read_tokens(os.path.join(a.data, a.domain, "train")), dtype=np.int64))
    T = p.tokens_per_sample
    rng = np.random.default_rng(1)
    amp = dev.type == "cuda"
    t0 = None
    for step in range(a.updates):
        if step == a.skip:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        starts = rng.integers(0, len(tokens) - T - 1, size=a.sequences)
        rows = torch.stack([tokens[s:s + T + 1] for s in starts]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(rows[:, :-1])[0]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.clip_norm)
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": (a.updates - a.skip) * a.sequences * T / elapsed,
            "peak_mem_mib": _peak_mem_mib(a.device), "params": sum(x.numel() for x in model.parameters())}


def run_btm(a) -> dict:
    from fairseq_ext.train import TrainSpec, read_train_log, train_lm
    from launcher.contract.presets import get_preset

    p = get_preset(a.preset)
    with tempfile.TemporaryDirectory() as tmp:
        train_lm(TrainSpec(data_dir=a.data, domains=[a.domain], save_dir=tmp, preset=a.preset,
                           max_updates=a.updates, save_interval_updates=10**9,
                           tokens_per_batch=a.sequences * p.tokens_per_sample, device=a.device,
                           log_interval=a.log_interval, valid_max_tokens=p.tokens_per_sample * 4,
                           compile=None if a.device.startswith("cuda") else False))
        rows = [r for r in read_train_log(tmp) if "tokens_per_s" in r and r["update"] > a.skip]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
            "peak_mem_mib": _peak_mem_mib(a.device)}


def run_fairseq(a) -> dict:
    from launcher.contract.presets import get_preset

    p = get_preset(a.preset)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fairseq_cli.train", a.data, "--user-dir", str(REPO / "fairseq_ext"),
               "--task", "multidomain_lm", "--domains", a.domain, "--sample-break-mode", "none",
               "--tokens-per-sample", str(p.tokens_per_sample), "--arch", "transformer_lm",
               "--decoder-layers", str(p.layers), "--decoder-embed-dim", str(p.embed_dim),
               "--decoder-input-dim", str(p.embed_dim), "--decoder-output-dim", str(p.embed_dim),
               "--decoder-ffn-embed-dim", str(p.ffn_dim), "--decoder-attention-heads", str(p.heads),
               "--share-decoder-input-output-embed", "--decoder-learned-pos",
               "--decoder-normalize-before", "--activation-fn", "gelu_accurate", "--no-scale-embedding",
               "--dropout", str(p.dropout), "--attention-dropout", str(p.dropout),
               "--batch-size", str(a.sequences), "--optimizer", "adam", "--adam-betas", "(0.9,0.95)",
               "--weight-decay", str(p.weight_decay), "--clip-norm", str(p.clip_norm), "--lr", str(p.lr),
               "--lr-scheduler", "polynomial_decay", "--warmup-updates", str(max(1, round(0.08 * a.updates))),
               "--total-num-update", str(a.updates), "--max-update", str(a.updates), "--seed", "1",
               "--save-dir", tmp, "--no-save", "--disable-validation", "--num-workers", "0",
               "--log-format", "simple", "--log-interval", str(a.log_interval)]
        if a.device.startswith("cuda"):
            cmd += ["--bf16"]
        else:
            cmd += ["--cpu"]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    # train_inner rows (--log-format simple): "... wps=1234.5, ... num_updates=20, ..."
    wps = [(int(m.group(2)), float(m.group(1))) for m in
           re.finditer(r"train_inner.*?wps[= ]([\d.]+).*?num_updates[= ](\d+)", proc.stdout + proc.stderr)]
    wps = [w for u, w in wps if u > a.skip]
    if not wps:
        raise SystemExit("no fairseq train_inner rows past the warm-up: raise --updates")
    import resource
    # Peak RSS of the fairseq-train process (CPU); fairseq reports no GPU peak we could read.
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"tokens_per_s": sum(wps) / len(wps),
            "peak_mem_mib": None if a.device.startswith("cuda") else rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared data dir")
    ap.add_argument("--domain", default="bible")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sequences", type=int, default=None, help="sequences per update (default: preset's)")
    ap.add_argument("--updates", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="warm-up updates not timed")
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the three runs, interleaved")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from launcher.contract.presets import get_preset

    p = get_preset(a.preset)
    a.sequences = a.sequences or p.sequences_per_gpu
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.only:
        print(json.dumps({"plain": run_plain, "btm": run_btm, "fairseq": run_fairseq}[a.only](a)))
        return

    print(f"load average at start: {load_average()}", flush=True)
    results: dict[str, list[dict]] = {"fairseq": [], "btm": [], "plain": []}
    for _ in range(a.rounds):
        for name in results:
            cmd = [sys.executable, __file__, "--only", name] + [x for x in sys.argv[1:]]
            if "--device" not in sys.argv:
                cmd += ["--device", a.device]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["wall_s"] = time.perf_counter() - t0
            results[name].append(r)
    med = {k: sorted(x["tokens_per_s"] for x in v)[len(v) // 2] for k, v in results.items()}
    params = results["plain"][0]["params"]
    print(f"preset {a.preset}: {p.layers} layers x {p.embed_dim}, {params / 1e6:.2f}M params, "
          f"batch {a.sequences} x {p.tokens_per_sample} tokens, {a.updates} updates "
          f"({a.skip} untimed), device {a.device}, rounds {a.rounds} (median)")
    print(f"{'trainer':<8} {'tokens/s':>10} {'vs fairseq':>10} {'vs plain':>9} {'peak MiB':>9}"
          + (" {:>6}".format("MFU") if a.device.startswith("cuda") else ""))
    for name in results:
        mem = results[name][0].get("peak_mem_mib")
        line = (f"{name:<8} {med[name]:>10.0f} {med[name] / med['fairseq']:>10.2f} "
                f"{med[name] / med['plain']:>9.2f} {'-' if mem is None else round(mem):>9}")
        if a.device.startswith("cuda"):
            import torch
            gpu = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
            flops = flops_per_token(params, p.layers, p.embed_dim, p.tokens_per_sample)
            line += f" {flops * med[name] / peak:>6.1%}" if peak else "      ?"
        print(line)
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
