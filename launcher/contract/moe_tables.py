"""A MoE model's two tables (stage moe, docs/moe.md), filed by the eval stage beside the
perplexity table and drawn by ``btm report``; stored, locked and validated like every results
table (launcher.contract.results: ``append_results(run, rows, spec)``, ``read_results(run, spec)``).

``RUN_DIR/results/routing.{csv,parquet}`` (``ROUTING``): routing statistics, one row per (run,
eval domain, split, layer, expert slot). ``RUN_DIR/results/inference.{csv,parquet}``
(``INFERENCE``): inference speed against one expert and the full ensemble, one row per (run,
model, split).
"""
from __future__ import annotations

import numpy as np

from launcher.contract.errors import BtmError
from launcher.contract.results import TableSpec, column_table, first_row

ROUTING_REQUIRED, ROUTING_OPTIONAL = column_table("""
    run                    str    run name (as in results.csv)
    eval_domain            str    domain whose tokens were routed
    split                  str    valid or test
    layer                  int    MoE layer (0 = the first)
    slot                   int    expert slot of that layer (0..N-1)
    expert                 str    the forest expert whose FFN the slot was built from
    share                  float  share of the domain's token-to-expert assignments at that layer that went to this slot
    tokens                 int    tokens routed (each is assigned to top_k slots)
""")
ROUTING_KEY = ["run", "eval_domain", "split", "layer", "slot"]

INFERENCE_REQUIRED, INFERENCE_OPTIONAL = column_table("""
    run                    str    run name (as in results.csv)
    model                  str    moe, expert:<name> (the one expert the ratio is against) or ensemble (every expert)
    split                  str    split whose blocks were run (valid or test)
    device                 str    torch device, e.g. cpu or cuda
    clock                  str    'process CPU' (CPU time of the process) or 'wall' (GPU, after a synchronize)
    models_run             int    dense models or MoEs run per batch (the ensemble runs every expert)
    tokens                 int    tokens in one timed pass
    seconds                float  median seconds of one pass (interleaved repeats)
    tokens_per_s           float  tokens / seconds
    ratio_to_expert        float  tokens_per_s over the one expert's, from the same run
""")
INFERENCE_KEY = ["run", "model", "split"]


def _check_routing(cols: dict[str, np.ndarray]) -> None:
    for col in ("layer", "slot", "tokens"):
        bad = cols[col] < (1 if col == "tokens" else 0)
        if bad.any():
            raise BtmError(f"routing: column {col!r} row {first_row(bad)} is out of range ({cols[col][first_row(bad)]})")
    bad = ~np.isfinite(cols["share"]) | (cols["share"] < 0) | (cols["share"] > 1)
    if bad.any():
        raise BtmError(f"routing: column 'share' row {first_row(bad)} must be in [0, 1], got {cols['share'][first_row(bad)]}")


def _check_inference(cols: dict[str, np.ndarray]) -> None:
    for col in ("models_run", "tokens", "seconds", "tokens_per_s", "ratio_to_expert"):
        bad = ~np.isfinite(cols[col]) | (cols[col] <= 0)
        if bad.any():
            raise BtmError(f"inference: column {col!r} row {first_row(bad)} must be positive, got {cols[col][first_row(bad)]}")


# Which experts a MoE model (stage moe) sends each evaluation domain's tokens to, per layer.
ROUTING = TableSpec("routing", ROUTING_REQUIRED, ROUTING_OPTIONAL, ROUTING_KEY, _check_routing)
# A MoE model's tokens/s against one expert's and the full ensemble's, timed in one process.
INFERENCE = TableSpec("inference", INFERENCE_REQUIRED, INFERENCE_OPTIONAL, INFERENCE_KEY, _check_inference)
