"""Model presets: the ELM architectures and the BTM paper's training settings.

Pure data (no torch) so that the planner can compute budgets on a login node. The paper's
settings (Li et al., 2022, "Branch-Train-Merge"): Adam betas (0.9, 0.95), lr 5e-4, weight
decay 0.1, gradient clip 0.1, polynomial decay with 8% warmup, 1024 tokens per sequence.
``tiny`` is ours: it trains in seconds on a CPU and exists for tests and the demo.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from launcher.contract.errors import BtmError


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # the registered fairseq arch in fairseq_ext/models/elm.py
    layers: int
    embed_dim: int
    heads: int
    ffn_dim: int
    tokens_per_sample: int = 1024
    dropout: float = 0.1
    # Training settings.
    lr: float = 5e-4
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    clip_norm: float = 0.1
    warmup_fraction: float = 0.08
    sequences_per_gpu: int = 16  # per-GPU batch; not stated in the seeds, GPT-2-small practice
    gpus: int = 1  # total GPUs of the dense run in the paper (the forest splits them)
    total_updates: int = 1000
    seed_updates: int = 500
    notes: str = field(default="", compare=False)

    @property
    def tokens_per_update_per_gpu(self) -> int:
        return self.sequences_per_gpu * self.tokens_per_sample

    def approx_params(self, vocab_size: int) -> int:
        """Parameter count of the GPT-2 layout (tied embeddings), for budgets and MFU."""
        d, f, n = self.embed_dim, self.ffn_dim, self.layers
        block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        return n * block + vocab_size * d + self.tokens_per_sample * d + 2 * d

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", "elm_tiny", layers=2, embed_dim=64, heads=2, ffn_dim=256,
               tokens_per_sample=128, dropout=0.0, lr=2e-3, sequences_per_gpu=8,
               gpus=1, total_updates=300, seed_updates=150,
               notes="CPU-sized for tests and the demo; not from the paper"),
        Preset("125m", "elm_125m", layers=12, embed_dim=768, heads=12, ffn_dim=3072,
               gpus=16, total_updates=80_000, seed_updates=40_000),
        Preset("350m", "elm_350m", layers=24, embed_dim=1024, heads=16, ffn_dim=4096,
               gpus=32, total_updates=32_000, seed_updates=16_000),
        Preset("750m", "elm_750m", layers=24, embed_dim=1536, heads=16, ffn_dim=6144,
               gpus=64, total_updates=24_000, seed_updates=12_000),
        Preset("1.3b", "elm_1_3b", layers=24, embed_dim=2048, heads=32, ffn_dim=8192,
               gpus=128, total_updates=12_000, seed_updates=6_000),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise BtmError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
