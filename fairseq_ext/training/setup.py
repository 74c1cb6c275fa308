"""Setup of one training process: the spec checked against its preset and data, where this
process runs (device, precision, its rank in the task's process group), how a batch splits
over ranks and micro-batches, the seeds, and the dictionary.

``set_up(spec)`` does these in this order; the order matters only for the seeds, which come
last because the model's random init (``resume.build_or_resume``) draws from them next.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from launcher.contract.errors import BtmError
from fairseq_ext.training.save_dir import TrainFiles

if TYPE_CHECKING:
    from launcher.contract.presets import Preset
    from fairseq_ext.training.spec import TrainSpec


@dataclass
class Ranks:
    """This process's place in its task's process group (one process: world 1, no group)."""

    world: int
    rank: int
    device: torch.device
    stop_group: object | None = None  # where ranks agree on "stop now" (gloo: no GPU sync)

    @property
    def writes_files(self) -> bool:
        """Rank 0 alone writes checkpoints and the log."""
        return self.rank == 0


@dataclass
class TrainSetup:
    """What ``set_up`` settled; read-only for the rest of the run."""

    spec: TrainSpec
    preset: Preset
    max_updates: int
    schedule_updates: int  # length of the lr schedule
    ranks: Ranks
    precision: str  # fp32 | bf16 | fp16
    dictionary: object  # fairseq Dictionary of the data dir
    sequences: int  # sequences per update, over all ranks
    micro: int  # sequences per micro-batch (one forward and backward on one rank)
    files: TrainFiles

    @property
    def pad(self) -> int:
        return self.dictionary.pad()

    @property
    def tokens_per_sample(self) -> int:
        return self.preset.tokens_per_sample

    @property
    def lr_peak(self) -> float:
        return self.spec.lr if self.spec.lr is not None else self.preset.lr

    @property
    def autocast_dtype(self):
        """None for fp32 (autocast off)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


def set_up(spec: TrainSpec) -> TrainSetup:
    from fairseq_ext.encoders import load_dictionary
    from fairseq_ext.registry import register_all
    from fairseq_ext.tasks.multidomain_lm import parse_domains

    register_all()
    preset, max_updates = resolve_spec(spec)
    parse_domains(spec.data_dir, spec.domains)
    files = TrainFiles(Path(spec.save_dir))
    files.save_dir.mkdir(parents=True, exist_ok=True)
    ranks = join_process_group(spec)
    if ranks.writes_files:
        files.remove_killed_saves()
    precision = pick_precision(spec, ranks.device)
    dictionary = load_dictionary(spec.data_dir)  # with the data's special ids (an hf tokenizer's)
    sequences, micro = split_batch(spec, preset, ranks.world)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    return TrainSetup(spec=spec, preset=preset, max_updates=max_updates,
                      schedule_updates=max(1, spec.schedule_updates or max_updates), ranks=ranks,
                      precision=precision, dictionary=dictionary, sequences=sequences,
                      micro=micro, files=files)


def resolve_spec(spec: TrainSpec) -> tuple[Preset, int]:
    """The spec's preset and update count, after checking what can be checked without torch."""
    from launcher.contract.names import validate_name
    from launcher.contract.presets import get_preset

    preset = get_preset(spec.preset)
    if not spec.domains:
        raise BtmError("no training domains given")
    for d in spec.domains:
        validate_name(d, "domain")
    max_updates = preset.total_updates if spec.max_updates is None else int(spec.max_updates)
    if max_updates < 0:
        raise BtmError(f"max_updates must be >= 0, got {max_updates}")
    if spec.save_interval_updates <= 0:
        raise BtmError(f"save_interval_updates must be > 0, got {spec.save_interval_updates}")
    if spec.update_freq < 1:
        raise BtmError(f"update_freq must be >= 1, got {spec.update_freq}")
    if spec.tensorboard:  # every rank: a rank that fails alone would leave the others waiting
        from fairseq_ext.training.tensorboard_log import check_tensorboard_installed

        check_tensorboard_installed()
    if not os.path.isfile(os.path.join(spec.data_dir, "dict.txt")):
        raise BtmError(f"data dir {spec.data_dir} has no dict.txt (run `btm data prepare`)")
    return preset, max_updates


def join_process_group(spec: TrainSpec) -> Ranks:
    """This process's rank and device; with several processes, join their group.

    ``torchrun --standalone`` (one node, fairseq_ext/multiproc.py) or srun tasks
    (several nodes, fairseq_ext/multinode.py) set WORLD_SIZE/RANK/LOCAL_RANK and MASTER_*.
    Every collective of the group times out after ``collective_timeout()``: a rank whose peer
    died (a node lost) fails instead of waiting forever.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(spec, world)
    if world == 1:
        return Ranks(world, rank, device)
    timeout = collective_timeout()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective aborts
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    stop_group = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else dist.group.WORLD
    return Ranks(world, rank, device, stop_group)


def collective_timeout():
    """``BTM_COLLECTIVE_TIMEOUT_S`` (default 600 s: longer than any one update or save of the
    presets' models, far shorter than torch's 30 min); set by the job from its profile."""
    from datetime import timedelta

    raw = os.environ.get("BTM_COLLECTIVE_TIMEOUT_S", "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise BtmError(f"BTM_COLLECTIVE_TIMEOUT_S must be a number of seconds > 0, got {raw!r}")
    return timedelta(seconds=seconds)


def pick_device(spec: TrainSpec, world: int = 1) -> torch.device:
    """The device of this process; with several processes, rank r of the node takes GPU r."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if spec.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        dev = torch.device(spec.device)
    except RuntimeError as e:
        raise BtmError(f"bad device {spec.device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BtmError(f"device {spec.device!r} requested but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank)
    if dev.type == "cuda" and world > 1:
        raise BtmError(f"device {spec.device!r} names one GPU, but {world} processes share this "
                       "run: use --device cuda (or auto) so that each takes its own GPU")
    return dev


def pick_precision(spec: TrainSpec, device: torch.device) -> str:
    if spec.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise BtmError(f"precision must be auto, fp32, bf16 or fp16, got {spec.precision!r}")
    if spec.precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if spec.precision in ("bf16", "fp16") and device.type == "cpu":
        raise BtmError(f"precision {spec.precision} is for GPUs; use fp32 on CPU")
    return spec.precision


def split_batch(spec: TrainSpec, preset: Preset, world: int) -> tuple[int, int]:
    """(sequences per update, sequences per micro-batch): the update's batch splits evenly over
    ``world`` ranks x ``update_freq`` micro-batches."""
    tokens_per_sample = preset.tokens_per_sample
    tokens_per_batch = spec.tokens_per_batch or preset.tokens_per_update_per_gpu * world
    sequences = tokens_per_batch // tokens_per_sample
    if sequences < world * spec.update_freq or sequences % (world * spec.update_freq):
        raise BtmError(f"tokens_per_batch {tokens_per_batch} = {sequences} sequences of "
                       f"{tokens_per_sample} tokens does not split over {world} GPU(s) x "
                       f"update_freq {spec.update_freq}")
    return sequences, sequences // (world * spec.update_freq)
