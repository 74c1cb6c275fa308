"""One update: this rank's micro-batches forward and backward (gradients accumulated, the loss
scaled for fp16), then unscale, clip and the optimizer step.

How the ranks split a batch: every rank holds the update's whole batch and takes micro-batches
``rank * update_freq + k``; each scales its summed loss by ``world / (targets of the whole
batch)``, so DDP's gradient average is the single-process gradient of the batch. Dropout is
seeded per (seed, update, micro-batch index): N ranks compute what one process with
``update_freq`` x N does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fairseq_ext.streams import IGNORED_TARGET
from fairseq_ext.training.schedule import lr_at, micro_seed
from fairseq_ext.training.torch_compile import compile_step

if TYPE_CHECKING:
    from fairseq_ext.training.resume import TrainState
    from fairseq_ext.training.setup import TrainSetup


class LossModule(torch.nn.Module):
    """``(inputs, targets) -> (loss_sum, n_targets)``: the unit DDP and torch.compile wrap."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets):
        return self.model.lm_loss(tokens, targets), (targets != IGNORED_TARGET).sum()


@dataclass
class StepOutcome:
    micro_losses: list  # (summed loss, target count) per micro-batch of this rank, in order
    grad_norm: torch.Tensor  # the gradients' total norm before clipping


class UpdateStep:
    """``step(update, inputs, targets)`` trains on update ``update``'s whole batch (this rank's
    share of it) and returns the micro-batches' losses."""

    def __init__(self, setup: TrainSetup, state: TrainState):
        spec, ranks = setup.spec, setup.ranks
        self.setup = setup
        self.model, self.optimizer, self.scaler = state.model, state.optimizer, state.scaler
        self.module = LossModule(state.model)
        if ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
            # A MoE's experts that no token of a micro-batch was routed to get no gradient there.
            self.module = DDP(self.module, device_ids=device_ids,
                              find_unused_parameters=hasattr(state.model, "moe_blocks"))
        use_compile = spec.compile if spec.compile is not None else ranks.device.type == "cuda"
        self.forward = compile_step(self.module) if use_compile else self.module

    def lr(self, update: int) -> float:
        s = self.setup
        return lr_at(update, s.lr_peak, s.schedule_updates, s.preset.warmup_fraction)

    def __call__(self, update: int, inputs: torch.Tensor, targets: torch.Tensor) -> StepOutcome:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(update)
        self.optimizer.zero_grad(set_to_none=True)
        # Every rank holds the whole batch, so each knows its target count without a collective.
        n_target = max(int((targets != IGNORED_TARGET).sum()), 1)
        micro_losses = [self._micro_batch(update, k, inputs, targets, n_target)
                        for k in range(self.setup.spec.update_freq)]
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   self.setup.preset.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepOutcome(micro_losses, grad_norm)

    def _micro_batch(self, update: int, k: int, inputs, targets, n_target: int):
        """Forward and backward of this rank's k-th micro-batch; its (summed loss, targets)."""
        s, ranks = self.setup, self.setup.ranks
        update_freq = s.spec.update_freq
        index = ranks.rank * update_freq + k  # this micro-batch's place in the batch
        x = inputs[index * s.micro:(index + 1) * s.micro].to(ranks.device, non_blocking=True)
        y = targets[index * s.micro:(index + 1) * s.micro].to(ranks.device, non_blocking=True)
        torch.manual_seed(micro_seed(s.spec.seed, update, index))
        # Accumulating micro-batches need no gradient all-reduce but the last.
        no_sync = ranks.world > 1 and k < update_freq - 1
        with self.module.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(ranks.device.type, dtype=s.autocast_dtype,
                                enabled=s.autocast_dtype is not None):
                loss_sum, n_tokens = self.forward(x, y)
            # DDP averages the gradients over the ranks, hence the factor world.
            self.scaler.scale(loss_sum * ranks.world / n_target).backward()
        return loss_sum.detach().float(), n_tokens
