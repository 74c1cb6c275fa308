"""``torch.compile`` around the training step, and the only errors that make it run eagerly.

A compile failure falls back to eager mode -- for the rest of the run, with a warning naming
the error -- only when the error means "torch.compile does not work here":

- this Python or platform has no dynamo (``check_if_dynamo_supported`` says why);
- dynamo cannot trace the step (``torch._dynamo.exc.Unsupported``);
- the backend compiler failed or is missing: ``BackendCompilerFailed`` (inductor's
  ``InductorError`` is one; it wraps e.g. a missing C++ compiler or a C++ compile error),
  ``TritonMissing``, ``GPUTooOldForTriton``, ``InvalidCxxCompiler``, ``CppCompileError``.

Everything else propagates. Out of memory above all (``torch.OutOfMemoryError``, also when a
backend failure wraps one, as an autotuning run that exhausts the GPU does): the batch does not
fit, and an eager run would hide that or fail later with less to go on. Any other error --
dynamo's internal errors, a shape error in the model traced under fake tensors -- is a bug
that eager mode would only mask.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch


def compile_step(module: torch.nn.Module) -> Callable:
    """``module`` compiled, or ``module`` itself where this platform cannot compile."""
    import torch._dynamo

    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as e:  # this function raises only to say "not on this platform"
        warnings.warn(f"torch.compile is not supported here ({e}); training eagerly")
        return module
    return CompiledStep(module, torch.compile(module))


class CompiledStep:
    """Calls ``compiled``; on an "unsupported here" error warns once and calls ``module`` from
    then on. ``compiled`` is ``torch.compile(module)`` (a test passes a stand-in)."""

    def __init__(self, module: Callable, compiled: Callable):
        self.module = module
        self.compiled = compiled

    def __call__(self, *args):
        if self.compiled is None:
            return self.module(*args)
        try:
            return self.compiled(*args)
        except _cannot_compile_errors() as e:
            if _out_of_memory_within(e):
                raise
            warnings.warn(f"torch.compile cannot compile the training step here "
                          f"({describe_error(e)}); training eagerly from now on")
            self.compiled = None
            return self.module(*args)


def _cannot_compile_errors() -> tuple[type[BaseException], ...]:
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    return (dynamo_exc.Unsupported, dynamo_exc.BackendCompilerFailed, inductor_exc.TritonMissing,
            inductor_exc.GPUTooOldForTriton, inductor_exc.InvalidCxxCompiler,
            inductor_exc.CppCompileError)


def _out_of_memory_within(error: BaseException) -> bool:
    """Whether ``error`` is, wraps or was caused by an out-of-memory error."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message``; for a backend failure, the wrapped error's too."""
    inner = getattr(error, "inner_exception", None)
    if inner is not None:
        return f"{type(error).__name__} wrapping {type(inner).__name__}: {_first_line(inner)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
