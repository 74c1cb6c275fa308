"""Learning curves in `btm report` (analysis/curves.py): logs written by the trainer's TrainLog."""
from __future__ import annotations

import json

import numpy as np

from analysis import curves, plots
from analysis.results import load_run
from analysis_synth import make_run
from conftest import run_btm
from fairseq_ext.training.save_dir import TrainFiles, TrainLog
from launcher.contract.layout import RunLayout

LOSSES = {"seed": [6.0, 5.0, 4.5], "bible": [4.5, 4.0], "legal": [4.5, 3.8], "dense": [6.0, 4.8, 4.2, 4.0]}
TOKENS_PER_UPDATE = {"seed": 1024, "bible": 512, "legal": 512, "dense": 2048}


def _write_training(run):
    layout = RunLayout(run)
    for model, losses in LOSSES.items():
        save_dir = layout.model_dir(model)
        save_dir.mkdir(parents=True, exist_ok=True)
        log = TrainLog(TrainFiles(save_dir).log)
        for i, loss in enumerate(losses):
            log.append({"update": 10 * i, "valid_loss": loss, "valid": {"x": loss}})
            log.append({"update": 10 * i + 5, "loss": loss + 0.1, "lr": 1e-3, "tokens_per_s": 100.0})
        n = 10 * (len(losses) - 1)
        stage, unit = {"seed": ("seed", None), "dense": ("dense", None)}.get(model, ("train", model))
        rec = {"stage": stage, "unit": unit, "started": 0.0, "finished": 1.0,
               "train": {"num_updates": n, "tokens": n * TOKENS_PER_UPDATE[model]}}
        (run / "records" / (f"{stage}.{unit}.json" if unit else f"{stage}.json")).write_text(json.dumps(rec))


def test_curves_have_every_validation_of_every_model_with_its_tokens(tmp_path):
    run = make_run(tmp_path, "r1", records=True)
    for stale in (run / "records").glob("*.json"):
        stale.unlink()
    _write_training(run)
    table = curves.learning_curves(load_run(run))
    assert list(dict.fromkeys(table["model"])) == ["seed", "bible", "legal", "dense"]
    assert list(dict.fromkeys(table["kind"])) == ["seed", "expert", "dense"]
    legal = table[table["model"] == "legal"]
    assert legal["update"].tolist() == [0, 10] and legal["valid_loss"].tolist() == [4.5, 3.8]
    assert legal["tokens"].tolist() == [0.0, 10 * 512.0]
    dense = table[table["model"] == "dense"]
    assert dense["tokens"].tolist() == [0.0, 20480.0, 40960.0, 61440.0]
    fig = plots.plot_learning_curves(table, "r1")
    assert [len(ax.lines) for ax in fig.axes[:2]] == [4, 4]
    np.testing.assert_array_equal(fig.axes[1].lines[0].get_xdata(), [0.0, 10240.0, 20480.0])


def test_a_torn_log_line_is_skipped_with_a_warning_naming_it(tmp_path, capsys):
    """A kill mid-append leaves a torn last line: it holds no complete row, so the curves keep
    every complete row and the warning names the file and line."""
    run = make_run(tmp_path, "r1")
    _write_training(run)
    before = curves.learning_curves(load_run(run))
    with open(RunLayout(run).model_dir("bible") / "train_log.jsonl", "a") as f:
        f.write('{"update": 3, "valid_lo\n')
    after = curves.learning_curves(load_run(run))
    assert after.equals(before)
    assert "bible/train_log.jsonl:5 is not a JSON row; skipping it" in capsys.readouterr().err


def test_report_plots_the_learning_curves(tmp_path):
    run = make_run(tmp_path, "r1")
    _write_training(run)
    without = make_run(tmp_path, "r2")
    run_btm("report", run, without, "--out", tmp_path / "out", check=True)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "![Learning curves, run r1](plots/learning_curves.r1.png)" in md
    assert (tmp_path / "out" / "plots" / "learning_curves.r1.png").stat().st_size > 0
    assert "### Learning curves, run r2\n\nOmitted: no train_log.jsonl" in md
