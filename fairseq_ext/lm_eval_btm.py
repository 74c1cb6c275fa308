"""lm-evaluation-harness model ``btm``: a forest (or one btm model) behind lm_eval's LM API.

lm_eval 0.4.x has no plugin discovery for models (no entry-point group, ``--include_path`` only
loads tasks): a model is found when the module that applies ``@register_model`` has been
imported. So:

- Python: ``import fairseq_ext.lm_eval_btm`` and then ``lm_eval.simple_evaluate(model="btm",
  model_args="forest=RUN,method=posterior,prior=RUN/priors/bible.<key>.json,top_k=2", ...)``;
- command line: ``python -m fairseq_ext.lm_eval_btm run --model btm --model_args ... --tasks ...``
  is lm_eval's own CLI (same arguments) with this module imported first.

Model arguments (``BtmLMConfig``): ``forest`` (run dir, its forest.json, or a directory of
``<name>.pt``) or ``checkpoint`` (one model: an expert, the dense model, a parameter average);
``method`` = ``expert`` (with ``expert=NAME``), ``uniform``, ``prior`` (the cached prior, fixed),
``posterior`` (Bayesian posterior, starting from the prior), ``average`` (the parameter average
of the experts with the prior's weights) or ``cluster`` (c-BTM: experts ``cluster_<i>`` weighted
by ``softmax(-||h - c_i||^2 / temperature)`` of the tf-idf + SVD embedding ``h`` of the text,
``clusters`` = the fitted model, default ``RUN/clusters/model``); ``prior`` = a cached prior JSON
(``RUN/priors/*.json``) or weights ``0.2:0.3:0.5``; ``top_k``; ``routing``; ``data_dir`` (the
tokenizer; by default the first checkpoint's ``cfg.task.data``).

``routing=token`` (default): the text ``context + continuation`` is one document with ``</s>``
in front (as btm scores documents); per-token mixture weights, the posterior evidence and top-k
are ``fairseq_ext.ensemble`` applied to the experts' per-token log-probs of that document (for
``cluster``: ``fairseq_ext.cluster.routing`` on the decoded text before each block of
``stride`` tokens). ``routing=prompt`` (``posterior`` and ``cluster``; c-BTM's few-shot rule):
the weights come once from the whole context (demonstrations and input): the domain posterior
``∝ prior_j * p_j(context)`` or the cluster weights of the embedded context text; the top k
are kept, and an option scores ``logsumexp_j(log w_j + log p_j(option | context))`` over the
kept experts only, which alone run on the options (the posterior's context likelihood needs
one pass of every expert per distinct context).

Only the experts the method needs are loaded: one for ``expert``, the top k by prior for
``prior`` + ``top_k``, one averaged model for ``average``. ``generate_until`` decodes greedily
from the mixture's next-token distribution. The experts, their loading and their mixture
weights are ``fairseq_ext.expert_mixture.ExpertMixture``; this module is the lm-eval adapter.

Checkpoints load with ``weights_only``; one that needs pickle (an old fairseq checkpoint) is
refused unless ``trust_checkpoint=true`` (btm's ``--trust-checkpoint``; only for files you trust).
"""
from __future__ import annotations

from dataclasses import fields

import numpy as np

from launcher.contract.errors import BtmError
from fairseq_ext.expert_mixture import BtmLMConfig, ExpertMixture, mixture_full

# ----------------------------------------------------------------------------- lm_eval model

def _lm_base():
    from fairseq_ext.hf_compat import hide_broken_torchaudio

    hide_broken_torchaudio()  # lm_eval imports transformers
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def _register(cls):
    from lm_eval.api.registry import register_model

    return register_model("btm")(cls)


def _flag(name: str, value) -> bool:
    """A yes/no model arg: lm_eval passes True/False parsed, or the text as given."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise BtmError(f"model_args {name}={value!r}: expected true or false")


@_register
class BtmLM(_lm_base()):
    """lm_eval's view of a btm forest (model name ``btm``; see the module docstring)."""

    backend = "causal"

    def __init__(self, batch_size=8, max_batch_size=None, device=None, **model_args):
        super().__init__()
        known = {f.name for f in fields(BtmLMConfig)}
        unknown = sorted(set(model_args) - known)
        if unknown:
            raise BtmError(f"unknown btm model_args {unknown}; known: {', '.join(sorted(known))}")
        if str(batch_size).startswith("auto"):
            batch_size = 8
        model_args = {k: v for k, v in model_args.items() if v is not None}
        for key, kind in (("top_k", int), ("max_length", int), ("max_gen_toks", int), ("stride", int),
                          ("temperature", float)):
            if key in model_args:
                try:
                    model_args[key] = kind(model_args[key])
                except ValueError:
                    raise BtmError(f"btm model_args: {key} must be a number, got {model_args[key]!r}") from None
        if "trust_checkpoint" in model_args:
            model_args["trust_checkpoint"] = _flag("trust_checkpoint", model_args["trust_checkpoint"])
        device = model_args.pop("device", None) or device or "cpu"
        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI asks for cuda by default; like its hf model, run on the CPU then.
            device = "cpu"
        self.cfg = BtmLMConfig(**model_args, batch_size=int(batch_size), device=str(device))
        self.mixture = ExpertMixture(self.cfg)
        from fairseq_ext.encoders import data_encoder

        # The data's separators (fairseq's </s>=2, or an hf tokenizer's own, docs/data.md): a
        # text is scored as a document, i.e. after eos (and the model's bos when it has one).
        encoder = data_encoder(self.mixture.data_dir)
        self.eos, self.pad = encoder.eos, encoder.pad
        bos = encoder.special_ids.get("bos_per_document")
        self.prefix = [self.eos] + ([bos] if bos is not None else [])
        self._max_length = min(self.cfg.max_length or self.mixture.max_positions, self.mixture.max_positions)

    @property
    def forward_sequences(self) -> int:
        """Sequences run through one model each so far (cost accounting)."""
        return self.mixture.forward_sequences

    # ---- tokenizer ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.mixture.data_dir)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        from fairseq_ext.data_prep import encode_text

        return encode_text(self.mixture.data_dir, string)

    def tok_decode(self, ids) -> str:
        from fairseq_ext.data_prep import decode_ids

        return decode_ids(self.mixture.data_dir, ids)

    # ---- scoring ------------------------------------------------------------------------
    def _document(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """(inputs, targets) of a token sequence read as one document (``prefix`` in front; a
        leading eos is lm-eval's empty context), keeping the last ``max_length`` targets."""
        full = self.prefix + list(tokens[1:] if tokens[:1] == [self.eos] else tokens)
        full = full[-(self.max_length + 1):]
        return full[:-1], full[1:]

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]],
                    contexts: list[str] | None = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) for token-id pairs, by the forest.

        ``contexts``: the context texts (routing=prompt with method=cluster embeds them;
        default: the decoded context ids)."""
        docs = [self._document(list(ctx) + list(cont)) for ctx, cont in pairs]
        n_cont = [len(cont) for _, cont in pairs]
        for (ctx, cont), (_, targets) in zip(pairs, docs):
            if len(cont) > len(targets):
                raise BtmError(f"continuation of {len(cont)} tokens does not fit in {self.max_length} positions")
        full_from = [len(d[1]) - k for d, k in zip(docs, n_cont)]
        if self.mixture.routing == "prompt":
            if contexts is None:
                contexts = [self.mixture.decode(ctx) for ctx, _ in pairs]
            log_w0 = self._prompt_log_weights([ctx for ctx, _ in pairs], contexts)
            which = [np.flatnonzero(np.isfinite(w)).tolist() for w in log_w0]
            lps, fulls = self.mixture.run([d[0] for d in docs], [d[1] for d in docs], full_from, which)
        else:
            lps, fulls = self.mixture.run([d[0] for d in docs], [d[1] for d in docs], full_from)
        from fairseq_ext import ensemble

        out = []
        for i, ((_, targets), k, lp, full) in enumerate(zip(docs, n_cont, lps, fulls)):
            if self.mixture.routing == "prompt":
                # the mixture of whole continuations over the kept experts (ensemble.sequence_log_weights)
                lp = lp[:, len(targets) - k:]
                log_w = ensemble.sequence_log_weights(log_w0[i][which[i]], lp)
            else:
                log_w = self.mixture.log_weights(lp, targets)[:, len(targets) - k:]
                lp = lp[:, len(targets) - k:]
            greedy = mixture_full(log_w, full).argmax(-1)
            out.append((float(ensemble.mix_log_weights(lp, log_w).sum()),
                        bool(np.array_equal(greedy, np.asarray(targets[len(targets) - k:])))))
        return out

    def _prompt_log_weights(self, context_ids: list[list[int]], texts: list[str]) -> np.ndarray:
        """[R, N] log weights of the experts for each request's whole context (-inf: not kept).

        ``cluster``: the embedded context text (``fairseq_ext.cluster.routing``). ``posterior``:
        Bayes with the prior from the context's likelihood under every expert (one pass of each
        expert per distinct context, its last ``max_length`` tokens), then top-k
        (``ensemble.prompt_log_weights``). An empty context carries no evidence: the cluster sizes
        or the prior."""
        from fairseq_ext import ensemble

        if self.mixture.method == "cluster":
            unique = list(dict.fromkeys(texts))
            rows = dict(zip(unique, self.mixture.cluster_log_weights(unique)))
            return np.stack([rows[t] for t in texts])
        keys = [tuple(c[len(self.prefix):] if c[:len(self.prefix)] == self.prefix
                      else c[1:] if c[:1] == [self.eos] else c) for c in context_ids]  # no text
        unique = list(dict.fromkeys(keys))
        loglik = np.zeros((len(self.mixture.models), len(unique)))
        scored = [j for j, key in enumerate(unique) if key]
        if scored:
            docs = [self._document(list(unique[j])) for j in scored]
            lps, _ = self.mixture.run([d[0] for d in docs], [d[1] for d in docs], [len(d[1]) for d in docs])
            for j, lp in zip(scored, lps):
                loglik[:, j] = lp.sum(axis=1)
        log_w = ensemble.prompt_log_weights(loglik, self.mixture.prior, self.mixture.top_k).T
        index = {key: j for j, key in enumerate(unique)}
        return np.stack([log_w[index[key]] for key in keys])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        contexts = [key[0] if key else None for key, _, _ in requests]
        if any(c is None for c in contexts):
            contexts = None
        results = self.score_pairs([(ctx, cont) for _, ctx, cont in requests], contexts)
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string as one document (</s> in front), in blocks of
        ``max_length`` targets like btm's scorer, batched over all requests. A string has no
        prompt, so routing=prompt scores it with the method's token routing."""
        from fairseq_ext import ensemble
        from fairseq_ext.scoring import ContextSettings, forward_logprobs

        texts = [req.args[0] for req in requests]
        encoded = [self.tok_encode(t) for t in texts]
        nonempty = [i for i, ids in enumerate(encoded) if ids]
        encoded = [self.prefix[1:] + ids for ids in encoded]  # the model's bos, if it has one
        out = [0.0] * len(texts)
        if nonempty:
            tokens = np.concatenate([np.asarray(encoded[i], dtype=np.int64) for i in nonempty])
            lengths = np.array([len(encoded[i]) for i in nonempty])
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            ctx = ContextSettings(tokens_per_sample=self.max_length, reset_at_doc=True)
            lp = []
            for model in self.mixture.models:
                scores, passes = forward_logprobs(model, tokens, starts, ctx, eos=self.eos, pad=self.pad,
                                                  device=self.mixture.device, batch_size=self.mixture.batch_size)
                self.mixture.forward_sequences += passes
                lp.append(scores)
            lp = np.stack(lp).astype(np.float64)
            if len(self.mixture.models) == 1:
                mixed = lp[0]
            elif self.mixture.method == "cluster":
                from fairseq_ext.cluster.routing import token_route_weights_from_ids

                w = token_route_weights_from_ids(self.mixture.cluster_model, tokens, starts, self.mixture.decode,
                                                 stride=self.mixture.stride, temperature=self.mixture.temperature,
                                                 top_k=self.mixture.top_k)
                mixed = ensemble.mix_with_weights(lp, w)
            else:
                method = "posterior" if self.mixture.method == "posterior" else (
                    "prior" if self.mixture.prior is not None else "uniform")
                mixed = ensemble.ensemble_logprobs(lp, starts, method, self.mixture.prior, self.mixture.top_k)
            if len(self.prefix) > 1:  # bos is part of the document, not of the string's score
                mixed = np.where(np.isin(np.arange(len(mixed)), starts), 0.0, mixed)
            for i, total in zip(nonempty, np.add.reduceat(mixed, starts)):
                out[i] = float(total)
        for text, res in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return out

    # ---- generation ---------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding from the mixture's next-token distribution, batched over requests.

        routing=prompt: the kept experts and their weights come from the context; each step
        mixes them with those weights updated by the tokens generated so far (the next-token
        distribution of the mixture of whole continuations, as ``score_pairs`` scores them)."""
        states = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.cfg.max_gen_toks))
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise BtmError("the btm harness model decodes greedily only (do_sample/temperature unsupported)")
            states.append({"ids": self.prefix + self.tok_encode(context), "new": [], "until": until,
                           "max_new": max_new, "done": max_new <= 0, "context": context})
        prompt = self.mixture.routing == "prompt"
        if prompt and states:
            log_w0 = self._prompt_log_weights([s["ids"] for s in states], [s["context"] for s in states])
            for s, w in zip(states, log_w0):
                s["kept"] = np.flatnonzero(np.isfinite(w)).tolist()
                s["log_w"] = w[s["kept"]]  # log w0 + log p(generated so far), per kept expert
        while True:
            live = [s for s in states if not s["done"]]
            if not live:
                break
            # Inputs = the last max_length tokens; targets = the inputs shifted left plus a dummy
            # last target, so the last row is the next-token distribution.
            inputs = [(s["ids"] + s["new"])[-self.max_length:] for s in live]
            targets = [x[1:] + [self.pad] for x in inputs]
            lps, fulls = self.mixture.run(inputs, targets, [len(t) - 1 for t in targets],
                                         [s["kept"] for s in live] if prompt else None)
            for s, lp, full, tgt in zip(live, lps, fulls, targets):
                if prompt:
                    log_w = (s["log_w"] - np.logaddexp.reduce(s["log_w"]))[:, None]
                else:
                    lp = lp.copy()
                    lp[:, -1] = 0.0  # the dummy target: its value never enters the weights used
                    log_w = self.mixture.log_weights(lp, tgt)[:, -1:]
                token = int(mixture_full(log_w, full).argmax(-1)[0])
                if token == self.eos:
                    s["done"] = True
                    continue
                if prompt:
                    s["log_w"] = s["log_w"] + full[:, -1, token]
                s["new"].append(token)
                text = self.tok_decode(s["new"])
                if any(u and u in text for u in s["until"]) or len(s["new"]) >= s["max_new"]:
                    s["done"] = True
        results = []
        for req, s in zip(requests, states):
            text = self.tok_decode(s["new"])
            for u in s["until"]:
                if u:
                    text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            results.append(text)
        return results


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the ``btm`` model registered (this module is imported)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
