"""The update loop: set up, build or resume, then update, log, validate and save until done or
stopped. ``fairseq_ext.train.train_lm`` is its entry; the module docstring there is the contract.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from fairseq_ext.training.checkpoints import CheckpointWriter
from fairseq_ext.training.preemption import StopFlag, agree_to_stop
from fairseq_ext.training.resume import build_or_resume
from fairseq_ext.training.save_dir import TrainLog
from fairseq_ext.training.setup import set_up
from fairseq_ext.training.step import UpdateStep
from fairseq_ext.training.validation import validate_run

if TYPE_CHECKING:
    from fairseq_ext.training.spec import TrainResult, TrainSpec
    from fairseq_ext.training.resume import TrainState
    from fairseq_ext.training.setup import TrainSetup


def run_training(spec: TrainSpec) -> TrainResult:
    setup = set_up(spec)
    state = build_or_resume(setup)
    log = TrainLog(setup.files.log, writes=setup.ranks.writes_files, board=tensorboard_log(setup, state))
    if state.resumed:
        log.truncate_after(state.update)
    else:
        log.clear()
    run = TrainingRun(setup, state, UpdateStep(setup, state), CheckpointWriter(setup, state), log)
    try:
        if state.update >= setup.max_updates:
            return run.finish_without_training()
        return run.train()
    finally:
        log.close()


def tensorboard_log(setup: TrainSetup, state: TrainState):
    """The TensorBoard mirror of the log when the spec asks for one (rank 0 only), else None."""
    if not (setup.spec.tensorboard and setup.ranks.writes_files):
        return None
    from fairseq_ext.training.tensorboard_log import TensorBoardLog

    return TensorBoardLog(setup.files.tensorboard, setup.sequences * setup.tokens_per_sample,
                          state.update if state.resumed else None)


class LossWindow:
    """The training loss and throughput since the last log row (validation time excluded)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.targets = torch.zeros((), device=device, dtype=torch.long)
        self.start, self.tokens = time.perf_counter(), 0
        self.total_time, self.total_tokens = 0.0, 0

    def add(self, micro_losses: list, tokens: int) -> None:
        for loss_sum, n_targets in micro_losses:
            self.loss += loss_sum
            self.targets += n_targets
        self.tokens += tokens

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def close(self, world: int) -> tuple[float, float]:
        """(mean loss per target over the whole batch, tokens/s), and start the next window."""
        elapsed = time.perf_counter() - self.start
        self.total_time += elapsed
        self.total_tokens += self.tokens
        if world > 1:  # the loss of the whole batch, not of this rank's slice
            both = torch.stack([self.loss.double(), self.targets.double()])
            dist.all_reduce(both)
            self.loss.copy_(both[0])
            self.targets.copy_(both[1].long())
        closed = (float(self.loss) / max(int(self.targets), 1), self.tokens / max(elapsed, 1e-9))
        self.loss.zero_()
        self.targets.zero_()
        self.start, self.tokens = time.perf_counter(), 0
        return closed

    @property
    def tokens_per_second(self) -> float | None:
        return self.total_tokens / self.total_time if self.total_time > 0 else None


class TrainingRun:
    """One process's run from its start state to the end, a stop signal, or nothing to do."""

    def __init__(self, setup: TrainSetup, state: TrainState, step: UpdateStep,
                 writer: CheckpointWriter, log: TrainLog):
        self.setup, self.state, self.step, self.writer, self.log = setup, state, step, writer, log
        self.valid: dict = {}  # the latest validation's per-domain losses

    def train(self) -> TrainResult:
        setup, state = self.setup, self.state
        spec, ranks = setup.spec, setup.ranks
        window = LossWindow(ranks.device)
        preempted = False
        with StopFlag() as stop:
            while state.update < setup.max_updates:
                inputs, targets = state.stream.batch(state.update, setup.sequences)
                outcome = self.step(state.update, inputs, targets)
                state.update += 1
                window.add(outcome.micro_losses, setup.sequences * setup.tokens_per_sample)
                if state.update % spec.log_interval == 0 or state.update == setup.max_updates:
                    loss, tokens_per_s = window.close(ranks.world)
                    self.log.append({"update": state.update, "loss": loss,
                                     "lr": state.optimizer.param_groups[0]["lr"],
                                     "tokens_per_s": tokens_per_s})
                preempted = agree_to_stop(stop.requested, ranks.stop_group)
                self._save_point(preempted, window)
                if preempted:
                    break
        return self._result(preempted, window.tokens_per_second)

    def _save_point(self, stopping: bool, window: LossWindow) -> None:
        """At a save interval (or the end): validate, save best if better, save last. On a stop
        between save intervals: save last at once, without validating."""
        setup, state, writes = self.setup, self.state, self.setup.ranks.writes_files
        scheduled = (state.update % setup.spec.save_interval_updates == 0
                     or state.update == setup.max_updates)
        if stopping and not scheduled:
            # A full validation first could outlast the scheduler's grace period (USR2@grace)
            # and lose the whole interval.
            if writes:
                self.writer.save_last(self.valid)
            self.log.append({"update": state.update, "preempted_save": True})
        elif scheduled:
            started = time.perf_counter()
            self.valid, mean_valid = validate_run(setup, state.model)
            if state.best is None or mean_valid < state.best:
                state.best = mean_valid
                if writes:
                    self.writer.save_best(self.valid)
            if writes:
                self.writer.save_last(self.valid)
            self.log.append({"update": state.update, "valid_loss": mean_valid, "valid": self.valid})
            window.exclude(time.perf_counter() - started)  # validation is not training time

    def finish_without_training(self) -> TrainResult:
        """Nothing left to train: re-running a finished run is a no-op; a fresh run of zero
        updates (a seed fraction of 0) validates and saves its initial weights."""
        setup, state = self.setup, self.state
        if state.resumed:
            self.valid = state.saved_valid_losses
        elif setup.ranks.writes_files:
            self.valid, state.best = validate_run(setup, state.model)
            self.writer.save_last(self.valid)
            self.writer.save_best(self.valid)
            self.log.append({"update": 0, "valid_loss": state.best, "valid": self.valid})
        return self._result(False, None)

    def _result(self, preempted: bool, tokens_per_second: float | None) -> TrainResult:
        from fairseq_ext.training.spec import TrainResult

        files = self.setup.files
        if self.setup.ranks.world > 1:
            dist.barrier()  # no rank returns before rank 0 has saved
        return TrainResult(
            num_updates=self.state.update, preempted=preempted, best_valid_loss=self.state.best,
            valid_losses=self.valid, checkpoint_last=str(files.last),
            checkpoint_best=str(files.best) if files.best.exists() else None,
            tokens_per_second=tokens_per_second)
