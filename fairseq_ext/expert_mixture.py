"""The expert mixture behind the lm-eval model ``btm``: which experts, loaded, and how to mix them.

``ExpertMixture(BtmLMConfig)`` resolves the forest (``launcher.contract.forest``: a run dir, its
forest.json or a directory of ``<name>.pt``; or one ``checkpoint``), keeps the experts the
method needs (one for ``expert``, the top k by prior for ``prior`` + ``top_k``, one averaged
model for ``average``, the cluster experts for ``cluster``), loads them, runs them on token
sequences (``run``) and gives the per-token mixture weights (``log_weights``, token routing)
or the cluster weights of whole texts (``cluster_log_weights``, prompt routing). The methods
(``METHODS``) are the ``lm_eval`` arguments of the registry (launcher/contract/methods.py).
The lm-eval adapter that asks it for log-likelihoods and generations is
``fairseq_ext/lm_eval_btm.py``, whose docstring describes the model arguments.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from launcher.contract.errors import BtmError
from launcher.contract.methods import LM_EVAL_METHODS

METHODS = LM_EVAL_METHODS  # the lm-eval model argument ``method``
ROUTINGS = ("token", "prompt")
PROMPT_ROUTED = ("posterior", "cluster")  # the methods whose weights can come from the prompt


@dataclass
class BtmLMConfig:
    forest: str | None = field(default=None, metadata={"help": "run dir, forest.json or directory of <name>.pt experts"})
    checkpoint: str | None = field(default=None, metadata={"help": "one model instead of a forest"})
    method: str = field(default="posterior", metadata={"help": "expert | uniform | prior | posterior | average | cluster"})
    expert: str | None = field(default=None, metadata={"help": "the expert of method=expert"})
    prior: str | None = field(default=None, metadata={"help": "cached prior JSON, or weights a:b:c (default uniform)"})
    top_k: int | None = field(default=None, metadata={"help": "keep the k experts with the highest weight"})
    routing: str = field(default="token", metadata={"help": "token (per-token weights) | prompt (weights from the whole context)"})
    temperature: float = field(default=0.1, metadata={"help": "method=cluster: softmax temperature T of -d^2/T"})
    clusters: str | None = field(default=None, metadata={"help": "method=cluster: fitted cluster model dir (default RUN/clusters/model)"})
    stride: int = field(default=32, metadata={"help": "method=cluster, routing=token: tokens per routing block"})
    data_dir: str | None = field(default=None, metadata={"help": "tokenizer dir (spm.model, dict.txt)"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per input (default: model positions)"})
    max_gen_toks: int = field(default=256, metadata={"help": "default generation length"})
    trust_checkpoint: bool = field(default=False, metadata={
        "help": "let checkpoints that need pickle load (only for files you trust)"})


# ----------------------------------------------------------------------------- the mixture

def read_prior(spec: str, names: list[str]) -> np.ndarray:
    """A prior over ``names`` from a cached prior JSON (``by_expert`` or ``prior`` list, see
    fairseq_ext/priors.py) or from ``a:b:c`` weights in expert order."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BtmError(f"cannot read prior {path}: {e}") from None
        by_expert = data.get("by_expert")
        if by_expert:
            missing = [n for n in names if n not in by_expert]
            if missing:
                raise BtmError(f"prior {path} has no weight for expert(s) {', '.join(missing)}")
            values = [by_expert[n] for n in names]
        else:
            values = data.get("prior")
    else:
        try:
            values = [float(x) for x in spec.split(":")]
        except ValueError:
            raise BtmError(f"prior {spec!r} is neither a prior JSON file nor weights like 0.2:0.8") from None
    from fairseq_ext.ensemble import normalize_prior

    if values is None or len(values) != len(names):
        raise BtmError(f"prior {spec} has {0 if values is None else len(values)} weights for "
                       f"{len(names)} experts ({', '.join(names)})")
    return normalize_prior(values, len(names))


class ExpertMixture:
    """The selected experts of a forest, loaded, plus how to mix them (see the module doc)."""

    def __init__(self, cfg: BtmLMConfig):
        from fairseq_ext import ensemble
        from launcher.contract.forest import expert_checkpoints

        if cfg.method not in METHODS:
            raise BtmError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
        if cfg.routing not in ROUTINGS:
            raise BtmError(f"unknown routing {cfg.routing!r}; choose from {', '.join(ROUTINGS)}")
        if (cfg.forest is None) == (cfg.checkpoint is None):
            raise BtmError("give exactly one of forest=... or checkpoint=...")
        if cfg.top_k is not None and int(cfg.top_k) < 1:
            raise BtmError(f"top_k must be at least 1, got {cfg.top_k}")
        self.top_k = None if cfg.top_k is None else int(cfg.top_k)
        self.routing, self.temperature, self.stride = cfg.routing, float(cfg.temperature), int(cfg.stride)
        self.cluster_model = None
        self.forward_sequences = 0  # sequences run through one model each (cost accounting)
        if cfg.checkpoint is not None:
            experts = {Path(cfg.checkpoint).stem: Path(cfg.checkpoint)}
            if cfg.method not in ("expert", "posterior"):
                raise BtmError(f"checkpoint=... is one model; method {cfg.method!r} needs forest=...")
            self.method, cfg = "expert", BtmLMConfig(**{**cfg.__dict__, "expert": Path(cfg.checkpoint).stem})
        else:
            experts = expert_checkpoints(cfg.forest)
            self.method = cfg.method
        if self.routing == "prompt" and self.method not in PROMPT_ROUTED:
            raise BtmError(f"routing=prompt takes the weights from the prompt: use method=posterior "
                           f"(domain experts) or method=cluster (c-BTM), not {self.method!r}")
        names = list(experts)
        prior = read_prior(cfg.prior, names) if cfg.prior else None
        if self.method == "uniform" and self.top_k is not None:
            raise BtmError("top_k needs weights to rank experts by: use method=prior or posterior")
        if self.method == "expert":
            if cfg.expert not in experts:
                raise BtmError(f"method=expert needs expert=NAME, one of {', '.join(names)}; got {cfg.expert!r}")
            chosen = [cfg.expert]
        elif self.method in ("prior", "average") and self.top_k is not None:
            p = prior if prior is not None else np.full(len(names), 1.0 / len(names))
            chosen = [names[i] for i in ensemble.topk_experts(p, self.top_k)]
        elif self.method == "cluster":
            if cfg.prior:
                raise BtmError("method=cluster weights experts by distance to the cluster centres; "
                               "prior=... does not apply")
            self.cluster_model, chosen = self._clusters(cfg, experts)
        else:
            chosen = names
        self.names = chosen
        self.prior = None if prior is None else ensemble.normalize_prior(
            [prior[names.index(n)] for n in chosen], len(chosen))
        self.paths = [experts[n] for n in chosen]
        self._tmp = None
        if self.method == "average":
            self.paths = [self._average(self.paths, self.prior, cfg.trust_checkpoint)]
        from fairseq_ext.checkpoint import load_model

        loaded = [load_model(p, cfg.device, trust_pickle=cfg.trust_checkpoint) for p in self.paths]
        self.models = [m.model for m in loaded]
        self.dictionary = loaded[0].dictionary
        for p, m in zip(self.paths, loaded):
            if list(m.dictionary.symbols) != list(self.dictionary.symbols):
                raise BtmError(f"{p} has a different dictionary than {self.paths[0]}")
        self.device = cfg.device
        self.batch_size = int(cfg.batch_size)
        self.max_positions = min(int(m.max_positions()) for m in self.models)
        from fairseq_ext.checkpoint import load_checkpoint
        from fairseq_ext.export_hf import checkpoint_data_dir

        state = (load_checkpoint(self.paths[0], verify=False, trust_pickle=cfg.trust_checkpoint)
                 if cfg.data_dir is None else {})
        self.data_dir = checkpoint_data_dir(state, self.paths[0], cfg.data_dir)

    @staticmethod
    def _clusters(cfg: BtmLMConfig, experts: dict[str, Path]):
        """(the fitted cluster model, expert names in cluster order: cluster_0, cluster_1, ...)."""
        from fairseq_ext.cluster.assign import cluster_name
        from fairseq_ext.cluster.model_io import load_model as load_cluster_model

        if cfg.clusters:
            where = Path(cfg.clusters)
        else:
            source = Path(cfg.forest)
            where = (source.parent if source.is_file() else source) / "clusters" / "model"
        model = load_cluster_model(where)
        chosen = [cluster_name(i) for i in range(model.k)]
        missing = [n for n in chosen if n not in experts]
        if missing:
            raise BtmError(f"method=cluster needs one expert per cluster of {where} (k={model.k}); "
                           f"the forest lacks {', '.join(missing)} (experts: {', '.join(experts)})")
        return model, chosen

    def _average(self, paths, prior, trust_pickle: bool) -> Path:
        from fairseq_ext.averaging import average_checkpoints

        self._tmp = tempfile.TemporaryDirectory(prefix="btm-average-")
        out = Path(self._tmp.name) / "average.pt"
        weights = None if prior is None else [float(w) for w in prior]
        average_checkpoints(paths, weights or [1.0] * len(paths), out, trust_pickle=trust_pickle)
        return out

    def decode(self, ids) -> str:
        from fairseq_ext.data_prep import decode_ids

        return decode_ids(self.data_dir, ids)

    # ---- mixing ---------------------------------------------------------------------------
    def log_weights(self, lp: np.ndarray, targets) -> np.ndarray:
        """[N, T] per-token log mixture weights for one document's expert target log-probs
        ``lp`` [N, T] and its target ids (routing=token)."""
        from fairseq_ext import ensemble

        n, t = lp.shape
        if n == 1:
            return np.zeros((1, t))
        if self.method == "cluster":
            from fairseq_ext.cluster.routing import token_route_weights_from_ids

            w = token_route_weights_from_ids(self.cluster_model, np.asarray(targets), np.array([0]), self.decode,
                                             stride=self.stride, temperature=self.temperature, top_k=self.top_k)
            with np.errstate(divide="ignore"):
                return np.log(w).T
        method = "posterior" if self.method == "posterior" else ("prior" if self.prior is not None else "uniform")
        return ensemble.keep_top_k(ensemble.log_weights(lp, np.array([0]), method, self.prior), self.top_k)

    def cluster_log_weights(self, texts: list[str]) -> np.ndarray:
        """[R, N] log weights (-inf: dropped by top-k) of the cluster experts for whole texts."""
        from fairseq_ext.cluster.routing import route_weights

        with np.errstate(divide="ignore"):
            return np.log(route_weights(self.cluster_model, texts, self.temperature, self.top_k))

    # ---- forward passes -------------------------------------------------------------------
    def run(self, inputs: list[list[int]], targets: list[list[int]], full_from: list[int],
            which: list[list[int]] | None = None):
        """The selected models on the sequences, in batches of right-padded rows.

        ``which[i]``: indices of the models to run on sequence i (default: every model).
        Returns (target log-probs [len(which[i]), len_i] per sequence, full log-softmax rows
        [len(which[i]), len_i - full_from_i, V] per sequence) as numpy float64/float32.
        """
        import torch

        n = len(self.models)
        which = [list(range(n))] * len(inputs) if which is None else [list(w) for w in which]
        lps = [np.zeros((len(w), len(t)), dtype=np.float64) for w, t in zip(which, targets)]
        fulls = [None] * len(inputs)
        rows_of: list[list] = [[None] * len(w) for w in which]
        for m, model in enumerate(self.models):
            seqs = sorted((i for i in range(len(inputs)) if m in which[i]), key=lambda i: -len(inputs[i]))
            self.forward_sequences += len(seqs)
            for start in range(0, len(seqs), self.batch_size):
                rows = seqs[start:start + self.batch_size]
                width = max(len(inputs[i]) for i in rows)
                src = torch.full((len(rows), width), self.dictionary.pad(), dtype=torch.long)
                tgt = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    src[r, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
                    tgt[r, :len(targets[i])] = torch.tensor(targets[i], dtype=torch.long)
                src, tgt = src.to(self.device), tgt.to(self.device)
                with torch.inference_mode():
                    lp = torch.log_softmax(model(src)[0].float(), dim=-1)
                    target_lp = lp.gather(2, tgt[:, :, None])[:, :, 0].double().cpu().numpy()
                    for r, i in enumerate(rows):
                        slot = which[i].index(m)
                        lps[i][slot] = target_lp[r, :len(inputs[i])]
                        rows_of[i][slot] = lp[r, full_from[i]:len(inputs[i])].cpu().numpy()
        for i, got in enumerate(rows_of):
            fulls[i] = np.stack(got) if got else np.zeros((0, 0, len(self.dictionary)), dtype=np.float32)
        return lps, fulls

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def mixture_full(log_w_rows: np.ndarray, full: np.ndarray) -> np.ndarray:
    """[T, V] mixture log-distribution from log weights [N, T] and expert rows [N, T, V]."""
    from fairseq_ext.ensemble import logsumexp

    return logsumexp(log_w_rows[:, :, None] + full.astype(np.float64), axis=0)
