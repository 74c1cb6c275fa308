"""Merging expert checkpoints into one model: a registry of merge methods and a streamed driver.

    from fairseq_ext.merging import merge_checkpoints
    merge_checkpoints(expert_paths, weights, "merged/checkpoint.pt", method="ties",
                      params={"density": 0.2}, base=None)  # base from the experts' branch.json

Methods (one module each; docs/merging.md): linear, task_arithmetic, ties, dare_ties,
dare_linear, model_stock. ``fairseq_ext.averaging.average_checkpoints`` is the linear method.
"""
from fairseq_ext.merging.checkpoints import merge_checkpoints, tensor_generator
from fairseq_ext.merging.method import MergeMethod
from fairseq_ext.merging.registry import get_method, make_params, method_names

__all__ = ["MergeMethod", "get_method", "make_params", "merge_checkpoints", "method_names",
           "tensor_generator"]
