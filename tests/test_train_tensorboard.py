"""TensorBoard event files from the trainer (``TrainSpec.tensorboard``, config key
``training.tensorboard``, ``btm train --tensorboard``): off by default, on they hold the scalars of
train_log.jsonl at the same updates, and a resume keeps one value per update."""
import math
import shutil
import sys

import pytest

from conftest import require_fairseq, run_btm

pytestmark = pytest.mark.fairseq

DOMAINS = ["bible", "code_python", "legal"]  # the tiny config's training domains


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"), DOMAINS)


def _spec(data_dir, save_dir, **kw):
    from fairseq_ext.train import TrainSpec
    base = dict(data_dir=str(data_dir), domains=["bible"], save_dir=str(save_dir),
                tokens_per_batch=512, save_interval_updates=2, valid_max_tokens=1024,
                log_interval=2, schedule_updates=8, tensorboard=True)
    base.update(kw)
    return TrainSpec(**base)


def _scalars(event_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files under ``event_dir``: [(step, value)], as TensorBoard
    shows them (orphaned events of a restart purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_events_hold_the_train_log_and_a_resume_keeps_one_value_per_update(data_dir, tmp_path):
    from fairseq_ext.train import read_train_log, train_lm

    run = tmp_path / "run"
    train_lm(_spec(data_dir, run, max_updates=4))
    kept = tmp_path / "kept"  # checkpoint_last at update 4, to simulate a kill after it
    kept.mkdir()
    for name in ("checkpoint_last.pt", "checkpoint_last.pt.sha256"):
        shutil.copy(run / name, kept / name)
    train_lm(_spec(data_dir, run, max_updates=8))  # logs and validates 6 and 8 ...
    for name in ("checkpoint_last.pt", "checkpoint_last.pt.sha256"):  # ... whose save is then lost
        shutil.copy(kept / name, run / name)
    train_lm(_spec(data_dir, run, max_updates=8))  # the requeued job: from 4 to 8 again

    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 3  # one per start
    scalars = _scalars(run / "tensorboard")
    log = read_train_log(run)
    train_rows = [r for r in log if "loss" in r]
    valid_rows = [r for r in log if "valid_loss" in r]
    assert [r["update"] for r in train_rows] == [r["update"] for r in valid_rows] == [2, 4, 6, 8]
    # One value per update: the first 6 and 8 (lost work) are purged, not drawn twice.
    assert [step for step, _ in scalars["train/loss"]] == [2, 4, 6, 8]
    # tokens_per_s is timing, so the two runs of 6 and 8 differ there: what is shown is the
    # requeued run's, the one train_log.jsonl kept.
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/tokens_per_s", "tokens_per_s")):
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in train_rows], rel=1e-6), tag
    assert scalars["train/tokens"] == [(u, u * 512) for u in (2, 4, 6, 8)]
    assert [v for _, v in scalars["valid/loss"]] == pytest.approx([r["valid_loss"] for r in valid_rows], rel=1e-6)
    assert [v for _, v in scalars["valid/ppl"]] == pytest.approx(
        [math.exp(r["valid_loss"]) for r in valid_rows], rel=1e-5)
    assert [v for _, v in scalars["valid/bible/loss"]] == pytest.approx(
        [r["valid"]["bible"] for r in valid_rows], rel=1e-6)

    # Trained again from scratch (checkpoint_last deleted): the old events go with the old rows.
    (run / "checkpoint_last.pt").unlink()
    train_lm(_spec(data_dir, run, max_updates=2))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in _scalars(run / "tensorboard")["train/loss"]] == [2]


def test_off_by_default_and_refused_without_the_package(data_dir, tmp_path, monkeypatch):
    from fairseq_ext.train import TrainSpec, train_lm
    from launcher.contract.errors import BtmError

    assert TrainSpec(data_dir="d", domains=["bible"], save_dir="s").tensorboard is False
    train_lm(_spec(data_dir, tmp_path / "off", max_updates=2, tensorboard=False))
    assert (tmp_path / "off" / "checkpoint_last.pt").exists()
    assert not (tmp_path / "off" / "tensorboard").exists()

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # how Python marks a package absent
    with pytest.raises(BtmError, match=r"training\.tensorboard .*pip install tensorboard"):
        train_lm(_spec(data_dir, tmp_path / "missing", max_updates=2))
    assert not (tmp_path / "missing" / "checkpoint_last.pt").exists()  # refused before training


def test_config_key_reaches_the_trainer_through_the_seed_stage(data_dir, tmp_path):
    """``training.tensorboard: true`` in the config: the seed stage's real training writes
    events; the key is not one of the unit's params, so switching it retrains nothing."""
    from launcher.config import load_config
    from launcher.stages import find_unit, get_stage
    from launcher.stages.base import Ctx

    assert load_config("tiny").training.tensorboard is False
    cfg = load_config("tiny", overrides={"training.tensorboard": True, "budget.total_updates": 4})
    unit = find_unit(cfg, "seed", None)
    assert unit.params == find_unit(load_config("tiny", overrides={"budget.total_updates": 4}), "seed", None).params
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "data").symlink_to(data_dir, target_is_directory=True)
    stage = get_stage("seed")
    stage.run(Ctx(run_dir, cfg, unit, stage))
    assert [step for step, _ in _scalars(run_dir / "seed" / "tensorboard")["train/loss"]] == [2]


def test_bad_config_value_names_the_key():
    from launcher.config import load_config
    from launcher.contract.errors import BtmError

    with pytest.raises(BtmError, match=r"training\.tensorboard: expected true or false, got 'yes'"):
        load_config("tiny", overrides={"training.tensorboard": "yes"})


def test_btm_train_flag_on_two_ranks_writes_one_event_file(data_dir, tmp_path):
    """``--tensorboard`` travels with the spec to every torchrun rank (gloo on CPU); rank 0
    alone writes events."""
    save_dir = tmp_path / "expert"
    r = run_btm("train", "--data", str(data_dir), "--domain", "bible", "--save-dir", str(save_dir),
                "--updates", "2", "--log-interval", "1", "--save-interval-updates", "2",
                "--tokens-per-batch", "512", "--valid-max-tokens", "1024", "--device", "cpu",
                "--nproc-per-node", "2", "--tensorboard", check=True)
    assert '"num_updates": 2' in r.stdout
    assert len(list((save_dir / "tensorboard").iterdir())) == 1
    assert [step for step, _ in _scalars(save_dir / "tensorboard")["train/loss"]] == [1, 2]
