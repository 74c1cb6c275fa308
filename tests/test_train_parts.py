"""The trainer's parts alone (fairseq_ext/training/): build-or-resume and one update step, on a
tiny real ELM on CPU. tests/test_train.py tests them together through train_lm."""
import pytest

from conftest import require_fairseq

pytestmark = pytest.mark.fairseq

DOMAINS = ["bible", "legal"]


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"), DOMAINS)


def _spec(data_dir, save_dir, **kw):
    from fairseq_ext.train import TrainSpec
    base = dict(data_dir=str(data_dir), domains=DOMAINS, save_dir=str(save_dir), max_updates=10,
                tokens_per_batch=512, save_interval_updates=4, valid_max_tokens=1024,
                log_interval=2, device="cpu")
    base.update(kw)
    return TrainSpec(**base)


def _start(spec):
    from fairseq_ext.training.resume import build_or_resume
    from fairseq_ext.training.setup import set_up
    setup = set_up(spec)
    return setup, build_or_resume(setup)


def _assert_same_weights(model_state, other_state):
    import torch
    assert model_state.keys() == other_state.keys()
    for k in model_state:
        assert torch.equal(model_state[k].cpu(), other_state[k].cpu()), k


def test_fresh_start_is_update_zero_at_the_seeds_random_init(data_dir, tmp_path):
    setup, state = _start(_spec(data_dir, tmp_path / "a"))
    assert (state.update, state.resumed, state.best) == (0, False, None)
    assert state.stream.state() == {"epochs": [0, 0], "cursors": [0, 0]}
    assert state.optimizer.state_dict()["state"] == {}
    assert state.model.training and not state.scaler.is_enabled()  # fp32 on CPU: no loss scaling
    # The random init is drawn from the seed: the same seed draws the same weights, another not.
    _, same = _start(_spec(data_dir, tmp_path / "b"))
    _assert_same_weights(state.model.state_dict(), same.model.state_dict())
    _, other = _start(_spec(data_dir, tmp_path / "c", seed=2))
    name = "decoder.embed_tokens.weight"
    assert not (state.model.state_dict()[name] == other.model.state_dict()[name]).all()


def test_resume_restores_update_count_data_position_optimizer_and_rng(data_dir, tmp_path):
    import torch
    from fairseq_ext.checkpoint import load_checkpoint
    from fairseq_ext.train import train_lm

    save = tmp_path / "r"
    train_lm(_spec(data_dir, save, max_updates=5))  # saves checkpoint_last at update 4 and 5
    saved = load_checkpoint(save / "checkpoint_last.pt")
    saved_btm = saved["extra_state"]["btm"]
    torch.manual_seed(12345)  # resume must restore the RNG, not keep whatever it is

    _, state = _start(_spec(data_dir, save, max_updates=10))
    assert state.resumed and state.update == 5
    assert state.stream.state() == saved_btm["data_state"] != {"epochs": [0, 0], "cursors": [0, 0]}
    assert torch.equal(torch.get_rng_state(), saved_btm["torch_rng"])
    assert state.best == saved_btm["best_valid_loss"] is not None
    assert state.saved_valid_losses == saved_btm["valid_losses"]
    _assert_same_weights(state.model.state_dict(), saved["model"])
    moments = state.optimizer.state_dict()["state"]
    assert len(moments) == len(list(state.model.parameters()))
    assert all(int(m["step"]) == 5 for m in moments.values())
    # The kernel choice stays this machine's, whatever the checkpoint's machine used.
    assert state.optimizer.param_groups[0]["foreach"] is True


def test_init_checkpoint_gives_weights_only_and_checkpoint_last_wins_over_it(data_dir, tmp_path):
    from fairseq_ext.checkpoint import load_checkpoint
    from fairseq_ext.train import train_lm

    train_lm(_spec(data_dir, tmp_path / "init", max_updates=3, save_interval_updates=3))
    init = tmp_path / "init" / "checkpoint_last.pt"
    _, state = _start(_spec(data_dir, tmp_path / "branch", init=str(init), seed=7))
    assert (state.update, state.resumed, state.best) == (0, False, None)
    assert state.stream.state() == {"epochs": [0, 0], "cursors": [0, 0]}
    assert state.optimizer.state_dict()["state"] == {}
    _assert_same_weights(state.model.state_dict(), load_checkpoint(init)["model"])

    train_lm(_spec(data_dir, tmp_path / "branch", init=str(init), seed=7, max_updates=2))
    _, resumed = _start(_spec(data_dir, tmp_path / "branch", init=str(init), seed=7))
    assert resumed.resumed and resumed.update == 2


def test_init_checkpoint_with_another_dictionary_is_refused(data_dir, tmp_path):
    from launcher.contract.errors import BtmError
    from fairseq_ext import checkpoint as ck
    from fairseq_ext.train import train_lm

    train_lm(_spec(data_dir, tmp_path / "init", max_updates=0))
    state = ck.load_checkpoint(tmp_path / "init" / "checkpoint_last.pt")
    state["extra_state"]["btm"]["dictionary"]["symbols"][10] = "not-in-dict.txt"
    other = tmp_path / "other_vocab.pt"
    ck.save_checkpoint(state, other)
    with pytest.raises(BtmError, match="other_vocab.pt was trained with a different dictionary"):
        _start(_spec(data_dir, tmp_path / "x", init=str(other)))


def _grad_norm(model):
    import torch
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))


def test_update_step_learns_its_batch_and_clips_the_gradients(data_dir, tmp_path):
    from fairseq_ext.training.step import UpdateStep

    setup, state = _start(_spec(data_dir, tmp_path / "s", max_updates=20, update_freq=2))
    step = UpdateStep(setup, state)
    inputs, targets = state.stream.batch(0, setup.sequences)
    clip = setup.preset.clip_norm

    first = step(0, inputs, targets)
    assert len(first.micro_losses) == 2  # update_freq micro-batches, each forward and backward
    assert float(first.grad_norm) > 10 * clip  # a fresh model's gradients need clipping ...
    assert float(_grad_norm(state.model)) <= clip * (1 + 1e-5)  # ... and were clipped
    assert state.optimizer.param_groups[0]["lr"] == step.lr(0) < setup.lr_peak  # warmup

    def mean_loss(outcome):
        return (sum(float(loss) for loss, _ in outcome.micro_losses)
                / sum(int(n) for _, n in outcome.micro_losses))

    losses = [mean_loss(first)] + [mean_loss(step(u, inputs, targets)) for u in range(1, 8)]
    assert losses[-1] < losses[0] - 1.0, losses  # the same batch again and again: it learns it


def test_update_step_accumulating_two_micro_batches_equals_one_batch(data_dir, tmp_path):
    """No dropout in the tiny preset, so only the order of float sums differs."""
    import torch
    from fairseq_ext.training.step import UpdateStep

    params = {}
    for update_freq in (1, 2):
        setup, state = _start(_spec(data_dir, tmp_path / f"f{update_freq}", update_freq=update_freq))
        inputs, targets = state.stream.batch(0, setup.sequences)
        UpdateStep(setup, state)(0, inputs, targets)
        params[update_freq] = state.model.state_dict()
    for name in params[1]:
        torch.testing.assert_close(params[1][name], params[2][name], rtol=0, atol=1e-6, msg=name)
