"""The CUDA paths: mixed precision, torch.compile, the chunked loss and the scorer on a GPU.

Skipped where CUDA is absent (CI has no GPU); `benchmarks/gpu_check.sh` runs them on one.

Tolerances, and why they are what they are:
- bf16 keeps 8 significant bits (unit roundoff 2^-9, about 0.2 %); fp16 keeps 11 (2^-12). Under
  autocast only the matmul inputs and outputs are rounded; weights, the optimizer and the loss's
  log-sum-exp stay fp32, and the mean loss averages the per-token rounding of ~500 targets. So the
  first update (identical weights) must agree with fp32 to 1 %, five times the per-element
  roundoff; after 30 updates the trajectories may have drifted apart, so the mean of the last
  five losses must agree to 3 %. A real fault (a lost loss scale, a wrong cast, gradients
  not reaching a layer) stops the loss from falling by 0.5 nats, i.e. more than 10 %.
- compile on/off in fp32 computes the same maths with other kernels (fused reductions in
  another order): differences start at fp32 roundoff (6e-8) and after 30 Adam updates stay far
  below 1e-4 relative; anything semantic (dropout, masking, scaling) differs by percent.
- the chunked loss in fp32 is the same sums in another grouping: 1e-5 relative.
- the bf16 scorer rounds the logits to bf16 (|logit| <= ~16 here: rounding <= 0.03 nats each),
  then takes log-softmax in fp32; per token at most 0.25 nats apart from fp32 scoring, the
  mean log-prob over the split within 0.5 % (rounding errors of opposite sign cancel).
"""
from __future__ import annotations

import importlib.util
import math

import pytest

from conftest import require_fairseq

pytestmark = [pytest.mark.gpu, pytest.mark.fairseq]

UPDATES = 30
INITIAL_LOSS_SCALE = 2.0 ** 16  # torch.amp.GradScaler's default init_scale
DOMAIN = "python_code"


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch
    return torch.cuda.is_available()


@pytest.fixture(autouse=True)
def needs_cuda():
    if not _cuda_available():
        pytest.skip("no CUDA device")  # never a CI failure: CI machines have no GPU
    require_fairseq()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The demo corpus (built offline from the stdlib): a GPU machine has no ../shared/corpus."""
    if not _cuda_available():
        pytest.skip("no CUDA device")
    require_fairseq()
    from elm_testdata import build_data
    from launcher.demo_corpus import build_demo_corpus
    corpus = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(corpus, size=100_000)
    return build_data(corpus, tmp_path_factory.mktemp("data"), [DOMAIN])


def _train(data_dir, save_dir, **kw):
    """30 updates of the tiny preset on the GPU; the per-update losses and the result."""
    from fairseq_ext.train import TrainSpec, read_train_log, train_lm

    spec = TrainSpec(data_dir=str(data_dir), domains=[DOMAIN], save_dir=str(save_dir), device="cuda",
                     tokens_per_batch=512, max_updates=UPDATES, save_interval_updates=UPDATES,
                     valid_max_tokens=2048, log_interval=1, **kw)
    result = train_lm(spec)
    losses = [r["loss"] for r in read_train_log(save_dir) if "loss" in r]
    assert len(losses) == UPDATES
    return losses, result


@pytest.fixture(scope="module")
def fp32_run(data_dir, tmp_path_factory):
    return _train(data_dir, tmp_path_factory.mktemp("fp32"), precision="fp32", compile=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_like_fp32(data_dir, fp32_run, tmp_path, precision):
    from fairseq_ext.checkpoint import load_checkpoint

    reference, _ = fp32_run
    losses, result = _train(data_dir, tmp_path, precision=precision, compile=False)
    scaler = load_checkpoint(result.checkpoint_last)["extra_state"]["btm"]["scaler"]
    skipped = 0
    if precision == "fp16":  # fp16 trains with a live loss scale, saved for resuming
        assert scaler and scaler["scale"] > 0
        # Each overflow skips its update and halves the scale (no growth within 2000 updates),
        # so fp16 is `skipped` updates behind fp32: compare it with fp32 that many updates back.
        skipped = round(math.log2(INITIAL_LOSS_SCALE / scaler["scale"]))
        assert 0 <= skipped <= 10
    else:
        assert not scaler  # bf16 has fp32's range: no scaling
    assert losses[0] == pytest.approx(reference[0], rel=0.01)
    behind = reference[:len(reference) - skipped]
    assert sum(losses[-5:]) / 5 == pytest.approx(sum(behind[-5:]) / 5, rel=0.03)
    assert losses[-1] < losses[0] - 0.5 and reference[-1] < reference[0] - 0.5  # both learn


def test_compile_on_and_off_give_the_same_losses(data_dir, fp32_run, tmp_path):
    import warnings

    eager, _ = fp32_run
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile")  # a fallback to eager fails here
        compiled, _ = _train(data_dir, tmp_path, precision="fp32", compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4)


def _loss_inputs(n=4096, dim=256, vocab=5000, seed=0):
    import torch
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, dim, device="cuda", generator=gen, requires_grad=True)
    weight = (0.05 * torch.randn(vocab, dim, device="cuda", generator=gen)).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    targets[::7] = -100  # ignored positions (padding)
    return hidden, weight, targets


def test_chunked_loss_equals_full_loss_on_cuda():
    import torch
    import torch.nn.functional as F
    from fairseq_ext.models.elm import chunked_tied_cross_entropy

    hidden, weight, targets = _loss_inputs()
    chunked = chunked_tied_cross_entropy(hidden, weight, targets, chunk=300)  # 300 does not divide 4096
    grads = torch.autograd.grad(chunked, (hidden, weight))
    full = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")
    full_grads = torch.autograd.grad(full, (hidden, weight))
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    # The weight's gradient sums 4096 rows in another order: near-zero entries differ by a few
    # 1e-6 absolute (a CPU run of this test measured 2e-6), hence the absolute bound.
    for got, want in zip(grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_chunked_loss_peak_memory_is_below_full_logits():
    import torch
    import torch.nn.functional as F
    from fairseq_ext.models.elm import chunked_tied_cross_entropy

    def peak_above_inputs(loss_fn) -> int:
        hidden, weight, targets = _loss_inputs(n=16384, dim=512, vocab=32000)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(hidden, weight, targets).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    full = peak_above_inputs(lambda h, w, t: F.cross_entropy(h @ w.t(), t, reduction="sum"))
    chunked = peak_above_inputs(lambda h, w, t: chunked_tied_cross_entropy(h, w, t, chunk=1024))
    logits_bytes = 16384 * 32000 * 4  # 2 GiB of fp32 logits
    assert full >= logits_bytes  # the full loss holds at least its logits
    # The chunked loss holds the gradients (hidden + weight: 97 MiB) and a few 1024-row chunks
    # (125 MiB each), never the whole logits.
    assert chunked < logits_bytes / 2


def test_bf16_scorer_matches_fp32_scoring(data_dir, fp32_run):
    import numpy as np
    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.scoring import ContextSettings, forward_logprobs, read_split

    _, result = fp32_run
    tokens, starts = read_split(data_dir, DOMAIN, "test")
    context = ContextSettings(tokens_per_sample=128, context_window=32)
    scores = {}
    for device in ("cpu", "cuda"):  # fp32 on the CPU; bf16 autocast with fp32 log-softmax on CUDA
        loaded = load_model(result.checkpoint_last, device)
        scores[device], _ = forward_logprobs(loaded.model, tokens, starts, context, device=device,
                                             eos=loaded.dictionary.eos(), pad=loaded.dictionary.pad())
    fp32, bf16 = scores["cpu"], scores["cuda"]
    assert np.isfinite(bf16).all() and len(bf16) == len(tokens) > 1000
    assert np.abs(bf16 - fp32).max() <= 0.25
    assert bf16.mean() == pytest.approx(fp32.mean(), rel=0.005)
