"""The run config's schema: one dataclass per section, each field with its help text and, for
numbers, its range. ``launcher.config`` reads YAML into these and validates them; the rest of
btm imports them from there.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from launcher.contract.methods import CONFIG_METHODS, PRIOR_TEMPERATURES
from launcher.contract.presets import PRESETS

# Evaluation methods and baselines a config may ask for: launcher.contract.methods.
EVAL_METHODS = CONFIG_METHODS
# Every numeric field declares its range in its metadata ("min" or exclusive "above", "max" or
# exclusive "below"), checked when the config is read: --dry-run refuses a bad value, not a
# stage hours later or the cluster.
# vocab_size: 4 special + 256 byte pieces + 1 learned, the bound fairseq_ext.data_prep checks.
MIN_VOCAB_SIZE = 4 + 256 + 1


@dataclass
class CorpusConfig:
    path: str | None = field(default=None, metadata={"help": "corpus directory CORPUS/<domain>/<split>.jsonl[.gz]; relative to the config file; --corpus overrides"})
    text_field: str = field(default="text", metadata={"help": "JSON field holding the document text"})
    vocab_size: int = field(default=8000, metadata={"help": "sentencepiece vocabulary size", "min": MIN_VOCAB_SIZE})
    tokenizer: str | None = field(default=None, metadata={"help": "hf:PATH: encode with that transformers directory's tokenizer.json instead of training sentencepiece (docs/data.md); relative to the config file"})
    shard_mb: float = field(default=256.0, metadata={"help": "data prep cuts each split file into shards of about this many MB (a smaller file is one shard); docs/data.md", "above": 0})
    shard_tasks: int = field(default=1, metadata={"help": "tasks of the data_shard array that binarize the shards (each a pool of its CPUs)", "min": 1})


@dataclass
class DomainsConfig:
    train: list[str] = field(default_factory=list, metadata={"help": "training domains, one expert each (btm); not set: every domain folder of the corpus"})
    eval: list[str] = field(default_factory=list, metadata={"help": "evaluation domains (may overlap train); not set: every domain folder of the corpus"})
    incremental: list[str] = field(default_factory=list, metadata={"help": "domains added to an existing forest, branched by `branching`"})


MIXTURES = ("balanced", "proportional")  # or a mapping {temperature: T}


@dataclass
class DataConfig:
    mixture: Any = field(default="balanced", metadata={"help": "how the seed LM and the dense baseline sample training domains: balanced (equal shares, the BTM paper's) | proportional (to tokens) | {temperature: T} (p_i ∝ tokens_i^(1/T))"})


@dataclass
class ModelConfig:
    preset: str = field(default="tiny", metadata={"help": f"model preset: {', '.join(PRESETS)}"})
    arch: str | None = field(default=None, metadata={"help": "layout: gpt2 | llama (default: the preset's; must be the preset's)"})
    init: str | None = field(default=None, metadata={"help": "hf:PATH: the seed LM is this local transformers model (GPT-2 or Llama family), trained on for budget.seed_fraction of the budget (0: used as is); the dense baseline starts from it too; relative to the config file"})
    trust_checkpoint: bool = field(default=False, metadata={"help": "allow model.init's pickle-only weights (pytorch_model.bin); pickle can run arbitrary code: set it only for files you trust"})


@dataclass
class BudgetConfig:
    total_updates: int | None = field(default=None, metadata={"help": "updates of the compute-matched dense run (default: the preset's)", "min": 1})
    gpus: int | None = field(default=None, metadata={"help": "GPUs of the dense run; total budget = total_updates x gpus (default: the preset's)", "min": 1})
    seed_fraction: float = field(default=0.5, metadata={"help": "share of the budget spent training the seed LM (0 = experts start from random init, or from model.init as is)", "min": 0.0, "below": 1.0})
    save_interval_updates: int = field(default=100, metadata={"help": "checkpoint_last every this many updates", "min": 1})


@dataclass
class TrainingConfig:
    tensorboard: bool = field(default=False, metadata={"help": "the trainer also writes TensorBoard event files (train loss, lr, tokens seen, valid loss/ppl per update) into each model dir's tensorboard/ (view: tensorboard --logdir RUN); needs `pip install tensorboard`; changing it retrains nothing"})


@dataclass
class BranchingConfig:
    rule: str = field(default="posterior", metadata={"help": "how incremental experts start: seed | posterior (weighted average of the top-k experts)"})
    top_k: int = field(default=2, metadata={"help": "experts averaged by the posterior rule", "min": 1})
    sample_docs: int = field(default=32, metadata={"help": "documents of the new domain used to estimate the posterior", "min": 1})


@dataclass
class ClustersConfig:
    k: int = field(default=4, metadata={"help": "number of clusters = experts (method: cbtm)", "min": 1})
    assign_tasks: int = field(default=1, metadata={"help": "tasks of the cluster_assign array (each assigns a contiguous slice of the corpus)", "min": 1})


@dataclass
class EvaluationConfig:
    split: str = field(default="test", metadata={"help": "split scored: valid | test"})
    methods: list[str] = field(default_factory=lambda: ["experts", "ensemble_uniform", "ensemble_posterior", "average_uniform"],
                               metadata={"help": f"evaluation methods: {', '.join(EVAL_METHODS)}"})
    top_k: int = field(default=1, metadata={"help": "experts kept by top-k mixing", "min": 1})
    prior_estimator: str = field(default="document", metadata={
        "help": "cached prior: document (whole-document Bayes posterior) | block_end (DEMix's "
                "previous-token posterior at each block's end, blocks of the preset's tokens_per_sample)"})
    prior_temperatures: list[float] = field(default_factory=lambda: list(PRIOR_TEMPERATURES), metadata={
        "help": "prior temperatures T (prior**(1/T)); several: the one best on the valid split. Default "
                "1, 3, 10, 30, 100: choosing among them won on btm-forest's valid split (mean ppl 163.8 "
                "train / 352.3 eval domains vs 164.1 / 373.4 untempered; docs/results.md); [1]: untempered"})


@dataclass
class MoeConfig:
    enabled: bool = field(default=False, metadata={"help": "turn the forest into one Mixture-of-Experts model and train it (stage moe, after merge)"})
    top_k: int = field(default=2, metadata={"help": "experts each token is routed to (<= number of experts)", "min": 1})
    router_init: str = field(default="zero", metadata={"help": "zero | data (each expert's mean hidden state on its own domain)"})
    weights: str = field(default="uniform", metadata={"help": "averaging weights of embeddings, attention, norms: uniform | posterior (mean cached prior over the training domains)"})
    train: str = field(default="all", metadata={"help": "router (routers only) | all (every parameter)"})
    budget_share: float = field(default=0.1, metadata={"help": "share of the budget's updates spent training the MoE (taken from the experts' updates)", "above": 0.0, "below": 1.0})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss", "min": 0.0})


@dataclass
class Config:
    name: str = field(default="run", metadata={"help": "run name (the `run` column of the results table)"})
    method: str = field(default="btm", metadata={"help": "btm (one expert per domain) | cbtm (one expert per cluster)"})
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    branching: BranchingConfig = field(default_factory=BranchingConfig)
    clusters: ClustersConfig = field(default_factory=ClustersConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    baselines: list[str] = field(default_factory=list, metadata={"help": "dense and/or random_split"})
    executor: str = field(default="local", metadata={"help": "local | slurm"})
    profile: str = field(default="local", metadata={"help": "cluster profile: slurm_templates/profiles/<name>.yaml or a path"})
    max_parallel: int = field(default=8, metadata={"help": "array throttle %K; local executor worker cap (also bounded by cores)", "min": 1})
    seed: int = field(default=1, metadata={"help": "random seed", "min": 0, "max": 2**32 - 1})
    # Where the config came from (for error messages); not part of the YAML.
    source: str = field(default="<config>", metadata={"internal": True})

    # ---- derived -------------------------------------------------------------------------
    @property
    def preset(self):
        return PRESETS[self.model.preset]

    @property
    def total_updates(self) -> int:
        return self.budget.total_updates or self.preset.total_updates

    @property
    def total_gpus(self) -> int:
        return self.budget.gpus or self.preset.gpus

    @property
    def expert_names(self) -> list[str]:
        """The base forest's experts: one per training domain (btm) or cluster (cbtm)."""
        if self.method == "cbtm":
            return [f"cluster_{i}" for i in range(self.clusters.k)]  # fairseq_ext.cluster.cluster_name
        return list(self.domains.train)

    @property
    def all_domains(self) -> list[str]:
        seen: dict[str, None] = {}
        for d in [*self.domains.train, *self.domains.incremental, *self.domains.eval]:
            seen[d] = None
        return list(seen)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
