"""Inference speed of a MoE model against one expert and the full ensemble, measured in one
process on the same batches: the report's "tokens/s relative to one expert" (rows of the
``inference`` table, launcher.contract.moe_tables.INFERENCE) and benchmarks/moe_inference.py.

Forward passes without gradients; every model is timed ``repeats`` times, interleaved with the
others, and the median pass counts. On the CPU the clock is the process's CPU time
(``time.process_time``), so a neighbour's load does not decide the ratio; on a GPU it is wall
time after a synchronize. The full ensemble runs every expert on the batch, which is what an
``ensemble_*`` method costs per token; the eval stage times it one expert at a time (the sum of
their medians), so its memory stays one expert and the MoE however large the forest.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

# Small on purpose: the eval stage pays for it once per MoE, and a ratio of medians over
# interleaved repeats is stable at this size (docs/benchmarks.md has the longer measurement).
EVAL_BATCHES, EVAL_BATCH_SIZE, EVAL_REPEATS = 4, 4, 3


def clock_name(device: str) -> str:
    return "wall" if device.startswith("cuda") else "process CPU"


def time_models(models: dict, batches: list, device: str, repeats: int) -> dict[str, float]:
    """``{name: median seconds of one pass over batches}`` for ``{name: [modules run per batch]}``,
    after one warm-up batch each (kernels, allocator)."""
    import torch

    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for modules in models.values():
            for m in modules:
                m(batches[0])
        for _ in range(repeats):
            for name, modules in models.items():
                if cuda:
                    torch.cuda.synchronize()
                t0 = clock()
                for x in batches:
                    for m in modules:
                        m(x)
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def speed_rows(seconds: dict[str, float], tokens: int, reference: str) -> list[dict]:
    """``{model, tokens, seconds, tokens_per_s, ratio_to_expert}`` per timed model; the ratio
    is against ``reference`` (the one expert)."""
    base = tokens / seconds[reference]
    return [{"model": name, "tokens": tokens, "seconds": s, "tokens_per_s": tokens / s,
             "ratio_to_expert": tokens / s / base} for name, s in seconds.items()]


def eval_batches(data_dir, domains: list[str], split: str, positions: int, pad: int, *,
                 batches: int, batch_size: int) -> list:
    """Up to ``batches`` batches of ``batch_size`` blocks of the domains' ``split``, in domain
    order (padding runs through the model like any token: it costs the same)."""
    import torch

    from fairseq_ext.moe.router_init import domain_blocks

    wanted, blocks = batches * batch_size, []
    for domain in domains:
        if len(blocks) >= wanted:
            break
        inputs, _ = domain_blocks(data_dir, domain, split, wanted * positions, positions, pad)
        blocks.extend(inputs[: wanted - len(blocks)])
    stacked = torch.stack(blocks)
    return [stacked[i:i + batch_size] for i in range(0, len(stacked), batch_size)]


def moe_inference_speed(checkpoint: Path, experts: dict[str, Path], data_dir, domains: list[str],
                        split: str, *, run: str, device: str = "cpu", batches: int = EVAL_BATCHES,
                        batch_size: int = EVAL_BATCH_SIZE, repeats: int = EVAL_REPEATS,
                        trust_pickle: bool = False) -> list[dict]:
    """Rows of the ``inference`` table for the MoE ``checkpoint``: the MoE (``moe``), the
    first expert (``expert:<name>``) and all ``experts`` together (``ensemble``) on the same
    blocks of ``domains``' ``split``."""
    from fairseq_ext.checkpoint import load_model

    moe = load_model(checkpoint, device, trust_pickle=trust_pickle)
    data = [x.to(device) for x in eval_batches(data_dir, domains, split, moe.model.max_positions(),
                                                moe.dictionary.pad(), batches=batches,
                                                batch_size=batch_size)]
    (first_name, first_path), *others = experts.items()
    first = f"expert:{first_name}"
    seconds = time_models({first: [load_model(first_path, device, trust_pickle=trust_pickle).model],
                           "moe": [moe.model]}, data, device, repeats)
    seconds["ensemble"] = seconds[first] + sum(
        time_models({"e": [load_model(path, device, trust_pickle=trust_pickle).model]}, data, device,
                    repeats)["e"] for _, path in others)
    tokens = sum(x.numel() for x in data)
    models_run = {first: 1, "moe": 1, "ensemble": len(experts)}
    return [{"run": run, "split": split, "device": device, "clock": clock_name(device),
             "models_run": models_run[row["model"]], **row}
            for row in speed_rows(seconds, tokens, first)]
