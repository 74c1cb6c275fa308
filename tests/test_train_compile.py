"""When the compiled training step runs eagerly instead (fairseq_ext/training/torch_compile.py).

What is simulated, and why: this CPU machine compiles fine, so every failure is provoked.
Where dynamo itself can produce the error on a CPU, the test goes through real
``torch.compile``: a backend that raises (dynamo wraps the error in ``BackendCompilerFailed``
exactly as it wraps inductor's "no C++ compiler"), or ``fullgraph=True`` on a step with a graph
break (dynamo raises ``Unsupported``). Errors only a GPU machine produces -- ``TritonMissing``,
CUDA out of memory while the compiled step runs -- come from a stand-in for the compiled
callable, and a platform without dynamo from a stand-in for torch's platform check.
"""
import warnings

import pytest

from conftest import require_fairseq

pytestmark = pytest.mark.fairseq


@pytest.fixture(autouse=True)
def fresh_dynamo():
    require_fairseq()
    import torch._dynamo
    torch._dynamo.reset()  # no compiled code or cached failure carries over between tests
    yield
    torch._dynamo.reset()


def _tiny_step():
    import torch

    class TinyStep(torch.nn.Module):
        """Stands in for the loss module: (inputs, targets) -> (loss_sum, n_targets)."""

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x, y):
            return ((self.linear(x) - y) ** 2).sum(), (y != 0).sum()

    torch.manual_seed(0)
    return TinyStep(), torch.randn(3, 4), torch.randn(3, 4)


def _raising_backend(error):
    def backend(graph_module, example_inputs):
        raise error
    return backend


def _assert_eager_result(step, module, x, y):
    import torch
    loss, n = step(x, y)
    expected_loss, expected_n = module(x, y)
    assert torch.equal(loss, expected_loss) and torch.equal(n, expected_n)


@pytest.mark.parametrize("make_error, named", [
    (lambda exc: exc.InvalidCxxCompiler(), "BackendCompilerFailed wrapping InvalidCxxCompiler"),
    (lambda exc: exc.CppCompileError(["g++", "step.cpp"], "fatal error: Python.h: No such file"),
     "BackendCompilerFailed wrapping CppCompileError"),
])
def test_backend_compiler_failure_falls_back_to_eager_with_a_warning(make_error, named):
    import torch
    import torch._inductor.exc as inductor_exc
    from fairseq_ext.training.torch_compile import CompiledStep

    module, x, y = _tiny_step()
    step = CompiledStep(module, torch.compile(module, backend=_raising_backend(make_error(inductor_exc))))
    with pytest.warns(UserWarning, match=f"{named}.*training eagerly from now on"):
        _assert_eager_result(step, module, x, y)
    assert step.compiled is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later updates run eagerly without warning again
        _assert_eager_result(step, module, x, y)


def test_untraceable_step_falls_back_to_eager_with_a_warning():
    import torch
    import torch._dynamo
    from fairseq_ext.training.torch_compile import CompiledStep

    module, x, y = _tiny_step()

    class GraphBreak(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x, y):
            torch._dynamo.graph_break()
            return self.inner(x, y)

    wrapped = GraphBreak()
    step = CompiledStep(wrapped, torch.compile(wrapped, fullgraph=True, backend="eager"))
    with pytest.warns(UserWarning, match="Unsupported.*training eagerly from now on"):
        _assert_eager_result(step, module, x, y)


def test_missing_triton_falls_back_to_eager_with_a_warning():
    import torch._inductor.exc as inductor_exc
    from fairseq_ext.training.torch_compile import CompiledStep

    module, x, y = _tiny_step()

    def compiled_without_triton(*args):  # what inductor raises for a CUDA graph without triton
        raise inductor_exc.TritonMissing(None)

    step = CompiledStep(module, compiled_without_triton)
    with pytest.warns(UserWarning, match="TritonMissing: Cannot find a working triton.*training eagerly"):
        _assert_eager_result(step, module, x, y)


def test_out_of_memory_while_compiling_propagates():
    """An autotuning run that exhausts the GPU reaches us wrapped in BackendCompilerFailed."""
    import torch
    import torch._dynamo.exc as dynamo_exc
    from fairseq_ext.training.torch_compile import CompiledStep

    module, x, y = _tiny_step()
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    step = CompiledStep(module, torch.compile(module, backend=_raising_backend(oom)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "training eagerly" warning
        with pytest.raises(dynamo_exc.BackendCompilerFailed) as raised:
            step(x, y)
    assert isinstance(raised.value.inner_exception, torch.OutOfMemoryError)
    assert step.compiled is not None


@pytest.mark.parametrize("error", [
    "out of memory",  # the compiled step itself runs out of GPU memory
    "bug",  # anything else: a bug that eager mode would hide
])
def test_other_errors_of_the_compiled_step_propagate(error):
    import torch
    from fairseq_ext.training.torch_compile import CompiledStep

    module, x, y = _tiny_step()
    raised = (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
              if error == "out of memory" else RuntimeError("mat1 and mat2 shapes cannot be multiplied"))

    def compiled(*args):
        raise raised

    step = CompiledStep(module, compiled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(raised)) as caught:
            step(x, y)
    assert caught.value is raised and step.compiled is compiled


def test_platform_without_dynamo_trains_eagerly_with_a_warning(monkeypatch):
    import torch._dynamo
    from fairseq_ext.training.torch_compile import CompiledStep, compile_step

    module, x, y = _tiny_step()

    def unsupported_platform():
        raise RuntimeError("Python 3.15+ not yet supported for torch.compile")

    monkeypatch.setattr(torch._dynamo.eval_frame, "check_if_dynamo_supported", unsupported_platform)
    with pytest.warns(UserWarning, match="not supported here.*Python 3.15.*training eagerly"):
        assert compile_step(module) is module
    monkeypatch.undo()
    assert isinstance(compile_step(module), CompiledStep)
