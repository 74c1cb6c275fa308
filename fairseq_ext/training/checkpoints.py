"""Writing a run's checkpoints (fairseq's format; fairseq_ext/checkpoint.py holds the format).

``checkpoint_last.pt`` carries what ``resume.restore_progress`` reads back: the optimizer state,
and in ``extra_state["btm"]`` the data position, torch RNG, best validation loss and loss-scaler
state. ``checkpoint_best.pt`` has the same weights-and-bookkeeping without the optimizer.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from fairseq_ext import checkpoint as ck  # ck.save_checkpoint is looked up per call (tests wrap it)

if TYPE_CHECKING:
    from fairseq_ext.training.resume import TrainState
    from fairseq_ext.training.setup import TrainSetup


class CheckpointWriter:
    """Saves ``state`` as it is at the time of each call (rank 0 calls it)."""

    def __init__(self, setup: TrainSetup, state: TrainState):
        from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig

        spec, preset = setup.spec, setup.preset
        task_cfg = MultidomainLMConfig(
            data=str(spec.data_dir), domains=",".join(spec.domains),
            tokens_per_sample=setup.tokens_per_sample,
            domain_weights=",".join(map(str, spec.domain_weights)) if spec.domain_weights else "",
            temperature=spec.temperature)
        self.cfg = ck.make_cfg(state.model_cfg, task_cfg, seed=spec.seed, optimizer={
            "_name": "adam", "adam_betas": str(tuple(preset.adam_betas)),
            "weight_decay": preset.weight_decay, "lr": [setup.lr_peak]})
        self.spec_dict = ck._plainify(asdict(spec))
        self.setup, self.state = setup, state

    def save_last(self, valid_losses: dict) -> None:
        self._save(self.setup.files.last, valid_losses, with_optimizer=True)

    def save_best(self, valid_losses: dict) -> None:
        self._save(self.setup.files.best, valid_losses, with_optimizer=False)

    def _save(self, path, valid_losses: dict, *, with_optimizer: bool) -> None:
        state = self.state
        opt_state = ck._plainify(state.optimizer.state_dict()) if with_optimizer else None
        checkpoint = ck.make_state(
            {k: v.detach().cpu() for k, v in state.model.state_dict().items()}, self.cfg,
            self.setup.dictionary, num_updates=state.update, optimizer_state=opt_state,
            lr_scheduler_state={"best": state.best, "num_updates": state.update},
            btm={"train_spec": self.spec_dict, "data_state": state.stream.state(),
                 "torch_rng": torch.get_rng_state(), "best_valid_loss": state.best,
                 "valid_losses": valid_losses,
                 "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
                 "init": self.setup.spec.init})
        ck.save_checkpoint(checkpoint, path)
