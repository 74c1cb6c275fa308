"""What one training run is given (``TrainSpec``, saved in each checkpoint it writes) and what
it returns (``TrainResult``). ``fairseq_ext.train`` is the public entry that hands them on."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class TrainSpec:
    """Everything one training run depends on; saved in each checkpoint it writes."""

    data_dir: str
    domains: list[str]  # training domains; validation is on these domains too
    save_dir: str
    preset: str = "tiny"
    domain_weights: list[float] | None = None  # sampling weights (normalized); None = temperature
    temperature: float = 1.0  # p_i ∝ n_i^(1/T) over training tokens when no weights
    init: str | None = None  # checkpoint to start from (seed/branch); None = random init
    max_updates: int | None = None  # None = the preset's total_updates
    schedule_updates: int | None = None  # length of the lr schedule; None = max_updates
    save_interval_updates: int = 100  # checkpoint_last + validation every this many updates
    tokens_per_batch: int | None = None  # per update, all GPUs; None = preset's per-GPU x GPUs
    update_freq: int = 1  # gradient accumulation steps per update
    lr: float | None = None  # None = the preset's
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool | None = None  # torch.compile the model; None = on GPU only
    valid_max_tokens: int | None = None  # cap on validation tokens per domain (None = all)
    log_interval: int = 10
    trust_init: bool = False  # allow a pickle-needing init checkpoint
    tensorboard: bool = False  # also write the log's scalars as TensorBoard events (tensorboard_log.py)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    num_updates: int
    preempted: bool = False
    best_valid_loss: float | None = None
    valid_losses: dict = field(default_factory=dict)  # domain -> nats/token at the end
    checkpoint_last: str | None = None
    checkpoint_best: str | None = None
    tokens_per_second: float | None = None
