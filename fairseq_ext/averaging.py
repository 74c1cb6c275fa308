"""Weighted parameter averaging of expert checkpoints: the linear merge method.

``average_checkpoints`` is ``fairseq_ext.merging.merge_checkpoints(method="linear")``: streamed
parameter by parameter over memory-mapped checkpoints, so averaging N experts needs the output
model plus a few tensors of the largest parameter's size, whatever N is
(benchmarks/average_memory.py, docs/benchmarks.md).

Arithmetic (exact and reproducible): weights are validated, normalized in float64, rounded to
float32, and the sum is ``acc = acc + w_i * float32(x_i)`` in the order the paths are given,
starting from zeros; the result is cast back to each tensor's original dtype.

Before adding anything, every checkpoint is checked against the first: same architecture
settings, same dictionary, same parameter names and shapes. The first mismatch raises BtmError
naming both checkpoints and the differing key or setting (``fairseq_ext.merging.compat``,
shared by every merge method).
"""
from __future__ import annotations


def average_checkpoints(paths, weights, out_path, *, safetensors_path=None,
                        btm_extra: dict | None = None, trust_pickle: bool = False) -> dict:
    """Write the weighted average of ``paths`` to ``out_path`` (fairseq checkpoint, update 0).

    ``trust_pickle`` (the CLI's ``--trust-checkpoint``) lets parents that need pickle load; the
    output is always a weights_only checkpoint, so this is also how a trusted legacy checkpoint
    is converted (``btm branch --from OLD --out NEW --trust-checkpoint``).

    Returns ``{"out": path, "sha256": ..., "weights": [normalized], "parents": [...]}``.
    """
    from fairseq_ext.merging import merge_checkpoints

    result = merge_checkpoints(paths, weights, out_path, method="linear",
                               safetensors_path=safetensors_path, btm_extra=btm_extra,
                               trust_pickle=trust_pickle)
    return {k: result[k] for k in ("out", "sha256", "weights", "parents")}
