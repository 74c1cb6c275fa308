"""btm's lean trainer: fairseq's data, model, task and checkpoint formats, our own loop.

Why not ``fairseq-train``: an expert is one small, independent job, and fairseq's trainer
spends much of a small model's step on generic machinery (dataset epoch iterators with
per-sample collation, meters, its own fp16 optimizer wrappers, no ``torch.compile``), resumes
through pickled iterator state, and offers no clean "save and exit 3 on SIGUSR2" contract. This
loop keeps what matters -- the same ``.bin/.idx`` data streamed into the same blocks, the
registered ``elm`` model, fairseq-format checkpoints that ``fairseq-eval-lm`` reads -- and adds
what BTM needs: deterministic resume from plain integers, chunked cross-entropy, fused AdamW,
bf16 autocast, ``torch.compile`` on GPU, and preemption handling.

Settings are the BTM paper's (from ``launcher.contract.presets``): AdamW betas (0.9, 0.95), lr, weight
decay 0.1 on every parameter (as fairseq's ``--optimizer adam --weight-decay`` does), gradient
clipping at 0.1, linear warmup over 8% of the updates then linear ("polynomial", power 1)
decay to 0.

Several processes (``torchrun --standalone --nproc-per-node N``, or ``fairseq_ext.multiproc``
which wraps it): the GPUs of one task form one DDP group (gloo on CPU), never spanning experts
or nodes. Every rank reads the same global batch and takes its slice, so the data position is
one set of integers; each rank scales its summed loss by ``world / (targets of the whole
batch)``, so DDP's gradient average is the single-process gradient of the same batch. Only
rank 0 writes checkpoints and the log; a stop signal seen by any rank stops every rank at the
same update. Dropout is seeded per (seed, update, micro-batch of the global batch): ranks draw
different masks, resume needs no per-rank RNG state, and N processes compute what one process
with ``update_freq`` x N does.

The parts, each usable alone (``fairseq_ext/training/``): ``setup.set_up`` (spec checks,
device, precision, process group, batch split, seeds, dictionary), ``resume.build_or_resume``
(fresh init, init checkpoint or checkpoint_last), ``step.UpdateStep`` (one update),
``checkpoints``/``validation``/``save_dir`` (what a save point writes and logs), and
``loop.run_training``, which ties them together.
"""
from __future__ import annotations

from fairseq_ext.training.save_dir import read_train_log
from fairseq_ext.training.schedule import lr_at
from fairseq_ext.training.spec import TrainResult, TrainSpec
from fairseq_ext.training.validation import evaluate

__all__ = ["TrainSpec", "TrainResult", "train_lm", "end_process_group", "evaluate", "lr_at",
           "read_train_log"]


def train_lm(spec: TrainSpec) -> TrainResult:
    """Train (or resume) one LM as described by ``spec``; see the module docstring."""
    from fairseq_ext.training.loop import run_training

    return run_training(spec)


def end_process_group() -> None:
    """After a distributed ``train_lm``: wait for every rank, then leave the group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
