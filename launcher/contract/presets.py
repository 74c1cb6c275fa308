"""Model presets: the ELM architectures and the BTM paper's training settings.

Pure data (no torch) so that the planner can compute budgets on a login node. The paper's
settings (Li et al., 2022, "Branch-Train-Merge"): Adam betas (0.9, 0.95), lr 5e-4, weight
decay 0.1, gradient clip 0.1, polynomial decay with 8% warmup, 1024 tokens per sequence.
``tiny`` is ours: it trains in seconds on a CPU and exists for tests and the demo; ``small``
(~10x tiny's parameters) is ours too, for the trend with model size on a CPU.

Two layouts (``Preset.layout``): ``gpt2``, the paper's ELM (fairseq model ``elm``,
fairseq_ext/models/elm.py), the default; and ``llama`` (fairseq model ``elm_llama``,
fairseq_ext/models/llama.py): RMSNorm, rotary positions, SwiGLU, no biases, grouped-query
attention (``kv_heads``), tied or untied output embedding. ``llama-tiny`` is CPU-sized; the
other llama presets have the shapes of common small open models so that their Hugging Face
weights import exactly (fairseq_ext/hf_import.py). Their training settings are btm's paper
settings with a lower peak lr for continued training, not the models' own recipes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from launcher.contract.errors import BtmError


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # the registered fairseq arch (fairseq_ext/models/elm.py or llama.py)
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
    # The layout, and the shape settings only the llama layout has.
    layout: str = "gpt2"  # gpt2 | llama (see LAYOUT_MODELS)
    kv_heads: int | None = None  # grouped-query attention: key/value heads (None = heads)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # output projection = input embedding
    # Llama 3's rope scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); None = plain rotary embeddings
    rope_llama3: tuple[float, float, float, int] | None = None

    def __post_init__(self):
        if self.layout not in LAYOUT_MODELS:
            raise BtmError(f"preset {self.name!r}: layout {self.layout!r} is not one of "
                           f"{', '.join(LAYOUT_MODELS)}")
        if self.layout == "gpt2" and (self.kv_heads is not None or not self.tie_embeddings
                                      or self.rope_llama3 is not None):
            raise BtmError(f"preset {self.name!r}: the gpt2 layout has no kv_heads nor rope "
                           "scaling and always ties its output embedding")
        if self.embed_dim % self.heads or self.heads % self.key_value_heads:
            raise BtmError(f"preset {self.name!r}: embed_dim {self.embed_dim}, heads {self.heads} "
                           f"and kv_heads {self.key_value_heads} do not divide")

    @property
    def key_value_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def tokens_per_update_per_gpu(self) -> int:
        return self.sequences_per_gpu * self.tokens_per_sample

    def approx_params(self, vocab_size: int) -> int:
        """Parameter count of the model (exact for both layouts), for budgets and MFU."""
        d, f, n = self.embed_dim, self.ffn_dim, self.layers
        if self.layout == "llama":
            kv_dim = d // self.heads * self.key_value_heads
            block = 2 * d * d + 2 * d * kv_dim + 3 * d * f + 2 * d
            heads = 1 if self.tie_embeddings else 2
            return n * block + heads * vocab_size * d + d
        block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        return n * block + vocab_size * d + self.tokens_per_sample * d + 2 * d

    def to_dict(self) -> dict:
        return asdict(self)


# layout -> the fairseq model that implements it
LAYOUT_MODELS = {"gpt2": "elm", "llama": "elm_llama"}


def _llama(name: str, arch: str, **shape) -> Preset:
    """A llama-layout preset: no dropout, a continued-training lr, otherwise btm's settings."""
    settings = dict(dropout=0.0, lr=1e-4, gpus=8, total_updates=10_000, seed_updates=0)
    return Preset(name, arch, layout="llama", **(settings | shape))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", "elm_tiny", layers=2, embed_dim=64, heads=2, ffn_dim=256,
               tokens_per_sample=128, dropout=0.0, lr=2e-3, sequences_per_gpu=8,
               gpus=1, total_updates=300, seed_updates=150,
               notes="CPU-sized for tests and the demo; not from the paper"),
        # ~10x tiny's parameters (with a 4096-token vocabulary: 4.2M against 0.37M) for the
        # trend with model size at CPU scale. Same context, batch and updates as tiny: the paper
        # holds the token budget roughly fixed across sizes (docs/results.md, method), so tokens
        # per parameter fall ~10x. A lower lr for the 4x wider model (not tuned).
        Preset("small", "elm_small", layers=4, embed_dim=256, heads=4, ffn_dim=1024,
               tokens_per_sample=128, dropout=0.0, lr=1e-3, sequences_per_gpu=8,
               gpus=1, total_updates=300, seed_updates=150,
               notes="CPU-sized, ~10x tiny, for the size trend; not from the paper"),
        Preset("125m", "elm_125m", layers=12, embed_dim=768, heads=12, ffn_dim=3072,
               gpus=16, total_updates=80_000, seed_updates=40_000),
        Preset("350m", "elm_350m", layers=24, embed_dim=1024, heads=16, ffn_dim=4096,
               gpus=32, total_updates=32_000, seed_updates=16_000),
        Preset("750m", "elm_750m", layers=24, embed_dim=1536, heads=16, ffn_dim=6144,
               gpus=64, total_updates=24_000, seed_updates=12_000),
        Preset("1.3b", "elm_1_3b", layers=24, embed_dim=2048, heads=32, ffn_dim=8192,
               gpus=128, total_updates=12_000, seed_updates=6_000),
        _llama("llama-tiny", "llama_tiny", layers=2, embed_dim=64, heads=4, kv_heads=2,
               ffn_dim=176, tokens_per_sample=128, lr=2e-3, sequences_per_gpu=8, gpus=1,
               total_updates=300, seed_updates=150, tie_embeddings=False,
               notes="CPU-sized llama layout (GQA, untied) for tests; not a real model"),
        _llama("smollm2-135m", "llama_smollm2_135m", layers=30, embed_dim=576, heads=9,
               kv_heads=3, ffn_dim=1536, tokens_per_sample=2048, rope_theta=100000.0,
               notes="shape of HuggingFaceTB/SmolLM2-135M (vocab 49152)"),
        _llama("smollm2-360m", "llama_smollm2_360m", layers=32, embed_dim=960, heads=15,
               kv_heads=5, ffn_dim=2560, tokens_per_sample=2048, rope_theta=100000.0,
               notes="shape of HuggingFaceTB/SmolLM2-360M (vocab 49152)"),
        _llama("tinyllama-1.1b", "llama_tinyllama_1_1b", layers=22, embed_dim=2048, heads=32,
               kv_heads=4, ffn_dim=5632, tokens_per_sample=2048, tie_embeddings=False,
               notes="shape of TinyLlama/TinyLlama-1.1B (vocab 32000)"),
        _llama("smollm2-1.7b", "llama_smollm2_1_7b", layers=24, embed_dim=2048, heads=32,
               ffn_dim=8192, tokens_per_sample=2048, rope_theta=130000.0,
               notes="shape of HuggingFaceTB/SmolLM2-1.7B (vocab 49152)"),
        _llama("llama-3.2-1b", "llama_3_2_1b", layers=16, embed_dim=2048, heads=32, kv_heads=8,
               ffn_dim=8192, tokens_per_sample=2048, rope_theta=500000.0,
               rope_llama3=(32.0, 1.0, 4.0, 8192),
               notes="shape of meta-llama/Llama-3.2-1B (vocab 128256)"),
        _llama("llama-3.2-3b", "llama_3_2_3b", layers=28, embed_dim=3072, heads=24, kv_heads=8,
               ffn_dim=8192, tokens_per_sample=2048, rope_theta=500000.0,
               rope_llama3=(32.0, 1.0, 4.0, 8192),
               notes="shape of meta-llama/Llama-3.2-3B (vocab 128256)"),
    ]
}


def layout_of_arch(arch: str | None) -> str:
    """The layout (``gpt2`` or ``llama``) of a fairseq arch or model name (a checkpoint's
    ``cfg.model._name``)."""
    for preset in PRESETS.values():
        if preset.arch == arch:
            return preset.layout
    for layout, model in LAYOUT_MODELS.items():
        if model == arch:
            return layout
    raise BtmError(f"model arch {arch!r} is not a btm ELM arch; known: "
                   f"{', '.join([p.arch for p in PRESETS.values()] + list(LAYOUT_MODELS.values()))}")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise BtmError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
