"""fairseq task ``multidomain_lm``: language modelling over one domain or a mixture of domains.

Data layout (``btm data prepare``): ``DATA/dict.txt`` shared by all domains and
``DATA/<domain>/<split>.bin|.idx``, one item per document (tokens then eos).

Split names understood by ``load_dataset``:
- ``train``: a mixture of ``--domains`` (training domains), documents streamed into
  ``--tokens-per-sample`` blocks, each domain resampled to its share ``p_i`` of the epoch, where
  ``p_i`` comes from ``--domain-weights`` or, without them, ``p_i ∝ n_i^(1/T)`` over the domains'
  token counts ``n_i`` with ``T = --temperature`` (T=1: proportional, T→∞: uniform).
- ``valid`` / ``test`` (any other name): the concatenation of that split over ``--domains``.
- ``<domain>/<split>`` (e.g. ``legal/valid``): one domain's split, for per-domain evaluation.

So ``fairseq-eval-lm DATA --user-dir fairseq_ext --task multidomain_lm --domains legal
--gen-subset valid --path checkpoint_best.pt`` scores one domain. btm's own trainer streams the
same files through ``fairseq_ext.streams`` (faster than fairseq's batching, same blocks).
"""

import os
from dataclasses import dataclass, field

import numpy as np
from fairseq.data import ConcatDataset, ResamplingDataset
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from launcher.contract.errors import BtmError


@dataclass
class MultidomainLMConfig(LanguageModelingConfig):
    domains: str = field(
        default="", metadata={"help": "comma-separated domains (train mixture and eval splits); "
                              "empty = every domain directory under DATA"})
    domain_weights: str = field(
        default="", metadata={"help": "comma-separated sampling weights, one per domain "
                              "(normalized); empty = use --temperature"})
    temperature: float = field(
        default=1.0, metadata={"help": "p_i ∝ n_i^(1/T) over training tokens when no weights"})


def parse_domains(data_dir: str, domains: str | list[str] | None) -> list[str]:
    """The list of domains: given (validated against DATA) or every domain dir under DATA."""
    from launcher.contract.names import validate_name

    if isinstance(domains, str):
        domains = [d.strip() for d in domains.split(",") if d.strip()]
    if not domains:
        domains = sorted(d for d in os.listdir(data_dir)
                         if os.path.isdir(os.path.join(data_dir, d)) and not d.startswith("."))
    for d in domains:
        validate_name(d, "domain")
        if not os.path.isdir(os.path.join(data_dir, d)):
            raise BtmError(f"domain {d!r} not found in data dir {data_dir} "
                           f"(expected {os.path.join(data_dir, d)}/)")
    if not domains:
        raise BtmError(f"no domain directories in data dir {data_dir}")
    return list(domains)


def mixture_probs(token_counts: list[int], weights: list[float] | None = None,
                  temperature: float = 1.0) -> np.ndarray:
    """Sampling probabilities: normalized ``weights``, else ``p_i ∝ n_i^(1/T)``."""
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(token_counts):
            raise BtmError(f"{len(w)} domain weights given for {len(token_counts)} domains")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise BtmError(f"domain weights must be finite, >= 0 and not all zero: {list(weights)}")
        return w / w.sum()
    if not temperature > 0:
        raise BtmError(f"temperature must be > 0, got {temperature}")
    n = np.asarray(token_counts, dtype=np.float64)
    p = np.where(n > 0, n, 0.0) ** (1.0 / temperature)
    if p.sum() <= 0:
        raise BtmError("all training domains are empty")
    return p / p.sum()


@register_task("multidomain_lm", dataclass=MultidomainLMConfig)
class MultidomainLMTask(LanguageModelingTask):
    def domain_list(self) -> list[str]:
        return parse_domains(self.args.data, self.args.domains)

    def load_dataset(self, split: str, epoch=1, combine=False, **kwargs):
        if "/" in split:  # one domain: LanguageModelingTask reads DATA/<domain>/<split>
            return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        domains = self.domain_list()
        parts = []
        for d in domains:
            super().load_dataset(f"{d}/{split}", epoch=epoch, combine=combine, **kwargs)
            parts.append(self.datasets.pop(f"{d}/{split}"))
        if split == "train" and len(parts) > 1:
            weights = ([float(x) for x in self.args.domain_weights.split(",")]
                       if self.args.domain_weights else None)
            probs = mixture_probs([int(np.sum(p.sizes)) for p in parts], weights,
                                  self.args.temperature)
            total = sum(len(p) for p in parts)
            parts = [ResamplingDataset(p, size_ratio=prob * total / max(len(p), 1),
                                       seed=self.args.seed, epoch=epoch, replace=True)
                     for p, prob in zip(parts, probs) if prob > 0]
        self.datasets[split] = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        return self.datasets[split]
