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
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from launcher.contract.atomic import atomic_write_text
from launcher.contract.errors import BtmError


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


def lr_at(update: int, peak: float, total: int, warmup_fraction: float) -> float:
    """Linear warmup to ``peak`` over ``warmup_fraction * total`` updates, then linear decay to 0."""
    warmup = max(1, round(warmup_fraction * total))
    if update < warmup:
        return peak * (update + 1) / warmup
    return peak * max(0.0, (total - update) / max(1, total - warmup))


class _StopFlag:
    """SIGUSR2/SIGTERM set a flag; the loop finishes its update, saves and returns."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _pick_device(spec: TrainSpec, world: int = 1):
    """The device of this process; with several processes, rank r of the node takes GPU r."""
    import torch

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


def _pick_precision(spec: TrainSpec, device):
    import torch

    if spec.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise BtmError(f"precision must be auto, fp32, bf16 or fp16, got {spec.precision!r}")
    if spec.precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if spec.precision in ("bf16", "fp16") and device.type == "cpu":
        raise BtmError(f"precision {spec.precision} is for GPUs; use fp32 on CPU")
    return spec.precision


def _make_loss_module(model, pad: int):
    """``(inputs, targets) -> (loss_sum, n_targets)``: the unit DDP and torch.compile wrap."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens, targets):
            return self.model.lm_loss(tokens, targets), (targets != pad).sum()

    return LossModule()


def evaluate(model, data_dir: str, domains: list[str], tokens_per_sample: int, pad: int,
             device, *, split: str = "valid", max_tokens: int | None = None,
             batch_size: int = 16, autocast_dtype=None) -> dict[str, float]:
    """Mean next-token loss (nats) per domain over ``split`` (each target token once)."""
    import torch

    from fairseq_ext.streams import eval_blocks, read_tokens

    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for d in domains:
            tokens = read_tokens(os.path.join(data_dir, d, split))
            if max_tokens is not None:
                tokens = tokens[:max_tokens + 1]
            inputs, targets = eval_blocks(tokens, tokens_per_sample, pad)
            total, count = 0.0, 0
            for i in range(0, len(inputs), batch_size):
                x = inputs[i:i + batch_size].to(device)
                y = targets[i:i + batch_size].to(device)
                with torch.autocast(device.type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    total += float(_summed_loss(model, x, y, pad))
                count += int((y != pad).sum())
            out[d] = total / max(count, 1)
    model.train(was_training)
    return out


def _summed_loss(model, x, y, pad: int):
    """ELM's chunked loss, or full logits for other fairseq LMs (e.g. stock transformer_lm)."""
    import torch.nn.functional as F

    if hasattr(model, "lm_loss"):
        return model.lm_loss(x, y)
    logits = model(x)[0].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                           ignore_index=pad, reduction="sum")


def _resolve(spec: TrainSpec):
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
    if not os.path.isfile(os.path.join(spec.data_dir, "dict.txt")):
        raise BtmError(f"data dir {spec.data_dir} has no dict.txt (run `btm data prepare`)")
    return preset, max_updates


def train_lm(spec: TrainSpec) -> TrainResult:
    """Train (or resume) one LM as described by ``spec``; see the module docstring."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from fairseq.data import Dictionary
    from fairseq_ext import checkpoint as ck
    from fairseq_ext.models.elm import elm_config_for_preset
    from fairseq_ext.streams import MixtureBlockStream
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig, mixture_probs, parse_domains
    from fairseq_ext.registry import register_all

    register_all()
    preset, max_updates = _resolve(spec)
    schedule = max(1, spec.schedule_updates or max_updates)
    parse_domains(spec.data_dir, spec.domains)
    save_dir = Path(spec.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = save_dir / "checkpoint_last.pt", save_dir / "checkpoint_best.pt"
    log_path = save_dir / "train_log.jsonl"

    # One task's GPUs only: torchrun --standalone sets these for a single-node group.
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = _pick_device(spec, world)
    flags = None  # the group that agrees on "stop now" (gloo: no GPU sync per update)
    if world > 1:
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        flags = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    if rank == 0:  # only rank 0 writes here; another rank could delete its save in progress
        for stale in save_dir.glob(".checkpoint_*.pt.*.tmp"):  # a killed save's leftover
            stale.unlink(missing_ok=True)
    precision = _pick_precision(spec, device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    dictionary = Dictionary.load(os.path.join(spec.data_dir, "dict.txt"))
    pad = dictionary.pad()
    T = preset.tokens_per_sample
    tokens_per_batch = spec.tokens_per_batch or preset.tokens_per_update_per_gpu * world
    sequences = tokens_per_batch // T
    if sequences < world * spec.update_freq or sequences % (world * spec.update_freq):
        raise BtmError(f"tokens_per_batch {tokens_per_batch} = {sequences} sequences of {T} "
                       f"tokens does not split over {world} GPU(s) x update_freq "
                       f"{spec.update_freq}")
    micro = sequences // (world * spec.update_freq)

    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    model_cfg = elm_config_for_preset(preset.name)
    model_cfg._name = preset.arch
    resume = ck.load_checkpoint(last_path) if last_path.exists() else None
    init_state = None
    if resume is None and spec.init:
        init_state = ck.load_checkpoint(spec.init, trust_pickle=spec.trust_init)
        _check_same_dictionary(init_state, dictionary, spec.init, spec.data_dir)
    source = resume or init_state
    if source is not None:
        stored = dict(source["cfg"]["model"])
        if stored.get("_name") != preset.arch and resume is None:
            raise BtmError(f"init checkpoint {spec.init} is arch {stored.get('_name')!r}, "
                           f"but preset {preset.name!r} is {preset.arch!r}")
        for k, v in stored.items():
            if hasattr(model_cfg, k):
                setattr(model_cfg, k, v)
    model = ck.build_model_from_cfg(asdict(model_cfg) | {"_name": model_cfg._name}, dictionary)
    if source is not None:
        model.load_state_dict(source["model"], strict=True)
    model.to(device).train()

    lr_peak = spec.lr if spec.lr is not None else preset.lr
    opt_kwargs = dict(lr=lr_peak, betas=tuple(preset.adam_betas), eps=1e-8,
                      weight_decay=preset.weight_decay)
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    else:
        opt_kwargs["foreach"] = True
    optimizer = torch.optim.AdamW(model.parameters(), **opt_kwargs)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    probs = mixture_probs([_count_tokens(spec.data_dir, d) for d in spec.domains],
                          spec.domain_weights, spec.temperature)
    stream = MixtureBlockStream(spec.data_dir, spec.domains, probs, T, spec.seed)
    update = 0
    best = None
    if resume is not None:
        update = ck.num_updates(resume)
        bstate = ck.btm_state(resume)
        if resume.get("last_optimizer_state"):
            _load_optimizer(optimizer, resume["last_optimizer_state"])
        if bstate.get("scaler"):
            scaler.load_state_dict(bstate["scaler"])
        if bstate.get("data_state"):
            stream.load_state(bstate["data_state"])
        if bstate.get("torch_rng") is not None:
            torch.set_rng_state(bstate["torch_rng"])
        best = bstate.get("best_valid_loss")
        if rank == 0:
            _truncate_log(log_path, update)

    loss_module = _make_loss_module(model, pad)
    step_module = loss_module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        step_module = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    use_compile = spec.compile if spec.compile is not None else device.type == "cuda"
    compiled = torch.compile(step_module) if use_compile else None

    task_cfg = MultidomainLMConfig(
        data=str(spec.data_dir), domains=",".join(spec.domains), tokens_per_sample=T,
        domain_weights=",".join(map(str, spec.domain_weights)) if spec.domain_weights else "",
        temperature=spec.temperature)
    cfg = ck.make_cfg(model_cfg, task_cfg, seed=spec.seed, optimizer={
        "_name": "adam", "adam_betas": str(tuple(preset.adam_betas)),
        "weight_decay": preset.weight_decay, "lr": [lr_peak]})
    spec_dict = ck._plainify(asdict(spec))

    def save(path, valid=None):
        opt_state = ck._plainify(optimizer.state_dict()) if path == last_path else None
        state = ck.make_state(
            {k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg, dictionary,
            num_updates=update, optimizer_state=opt_state,
            lr_scheduler_state={"best": best, "num_updates": update},
            btm={"train_spec": spec_dict, "data_state": stream.state(),
                 "torch_rng": torch.get_rng_state(), "best_valid_loss": best,
                 "valid_losses": valid, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "init": spec.init})
        ck.save_checkpoint(state, path)

    def validate():
        losses = evaluate(model, spec.data_dir, spec.domains, T, pad, device,
                          max_tokens=spec.valid_max_tokens, autocast_dtype=autocast_dtype)
        return losses, float(np.mean(list(losses.values())))

    def log(row):
        if rank == 0:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    valid, mean_valid = {}, None
    if update >= max_updates:  # finished earlier: re-running is a no-op
        bstate = ck.btm_state(resume) if resume else {}
        if resume is None and rank == 0:  # zero updates requested (seed fraction 0)
            valid, best = validate()
            save(last_path, valid)
            save(best_path, valid)
            log({"update": 0, "valid_loss": best, "valid": valid})
        elif resume is not None:
            valid = bstate.get("valid_losses") or {}
        if world > 1:
            dist.barrier()  # the other ranks wait for rank 0's checkpoint
        return TrainResult(update, False, best, valid, str(last_path),
                           str(best_path) if best_path.exists() else None)

    result = TrainResult(update)
    window_loss = torch.zeros((), device=device)
    window_tokens = torch.zeros((), device=device, dtype=torch.long)
    window_start, window_ntok = time.perf_counter(), 0
    total_time, total_tokens = 0.0, 0
    with _StopFlag() as stop:
        while update < max_updates:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(update, lr_peak, schedule, preset.warmup_fraction)
            inputs, targets = stream.batch(update, sequences)
            optimizer.zero_grad(set_to_none=True)
            # Every rank holds the whole batch, so each knows its target count without a
            # collective; DDP averages over ranks, hence the factor world.
            n_target = max(int((targets != pad).sum()), 1)
            for k in range(spec.update_freq):
                index = rank * spec.update_freq + k  # this micro-batch's place in the batch
                x = inputs[index * micro:(index + 1) * micro].to(device, non_blocking=True)
                y = targets[index * micro:(index + 1) * micro].to(device, non_blocking=True)
                torch.manual_seed(_micro_seed(spec.seed, update, index))
                # Accumulating micro-batches need no gradient all-reduce but the last.
                no_sync = world > 1 and k < spec.update_freq - 1
                with step_module.no_sync() if no_sync else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=autocast_dtype,
                                        enabled=autocast_dtype is not None):
                        loss_sum, ntok = _run(compiled, step_module, x, y)
                        if compiled is not None and loss_sum is None:  # compile failed: eager
                            compiled = None
                            loss_sum, ntok = step_module(x, y)
                    scaler.scale(loss_sum * world / n_target).backward()
                window_loss += loss_sum.detach().float()
                window_tokens += ntok
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            update += 1
            window_ntok += sequences * T
            if update % spec.log_interval == 0 or update == max_updates:
                elapsed = time.perf_counter() - window_start
                total_time += elapsed
                total_tokens += window_ntok
                if world > 1:  # the loss of the whole batch, not of rank 0's slice
                    both = torch.stack([window_loss.double(), window_tokens.double()])
                    dist.all_reduce(both)
                    window_loss.copy_(both[0])
                    window_tokens.copy_(both[1].long())
                log({"update": update, "loss": float(window_loss) / max(int(window_tokens), 1),
                     "lr": optimizer.param_groups[0]["lr"],
                     "tokens_per_s": window_ntok / max(elapsed, 1e-9)})
                window_loss.zero_()
                window_tokens.zero_()
                window_start, window_ntok = time.perf_counter(), 0
            stopping = _agree(stop.signum is not None, flags)
            scheduled = update % spec.save_interval_updates == 0 or update == max_updates
            if stopping and not scheduled:
                # Preempted between save points: save at once. A full validation first could
                # outlast the scheduler's grace period (USR2@grace) and lose the whole interval.
                if rank == 0:
                    save(last_path, valid)
                log({"update": update, "preempted_save": True})
            elif scheduled:
                t0 = time.perf_counter()
                valid, mean_valid = validate()
                if best is None or mean_valid < best:
                    best = mean_valid
                    if rank == 0:
                        save(best_path, valid)
                if rank == 0:
                    save(last_path, valid)
                log({"update": update, "valid_loss": mean_valid, "valid": valid})
                window_start += time.perf_counter() - t0  # do not count validation as training
            if stopping:
                result.preempted = True
                break
    if world > 1:
        dist.barrier()
    result.num_updates = update
    result.best_valid_loss = best
    result.valid_losses = valid
    result.checkpoint_last = str(last_path)
    result.checkpoint_best = str(best_path) if best_path.exists() else None
    result.tokens_per_second = total_tokens / total_time if total_time > 0 else None
    return result


def end_process_group() -> None:
    """After a distributed ``train_lm``: wait for every rank, then leave the group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _micro_seed(seed: int, update: int, index: int) -> int:
    """The torch seed of micro-batch ``index`` of update ``update`` (dropout masks)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, update, index]).generate_state(1)[0])


def _agree(flag: bool, group) -> bool:
    """True on every rank if it is true on any (a signal may reach the ranks an update apart)."""
    if group is None:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _run(compiled, module, x, y):
    """Call the compiled module; on a compiler failure warn once and signal eager fallback."""
    if compiled is None:
        return module(x, y)
    try:
        return compiled(x, y)
    except Exception as e:  # torch.compile has many failure modes (no compiler, dynamo bug)
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training eagerly")
        return None, None


def _count_tokens(data_dir: str, domain: str) -> int:
    from fairseq_ext.streams import read_tokens

    return len(read_tokens(os.path.join(data_dir, domain, "train")))


def _check_same_dictionary(state: dict, dictionary, path, data_dir) -> None:
    stored = ck_dictionary_symbols(state)
    if stored is not None and stored != list(dictionary.symbols):
        raise BtmError(f"init checkpoint {path} was trained with a different dictionary than "
                       f"{os.path.join(data_dir, 'dict.txt')}")


def ck_dictionary_symbols(state: dict):
    from fairseq_ext.checkpoint import btm_state

    stored = btm_state(state).get("dictionary")
    return list(stored["symbols"]) if stored else None


def _load_optimizer(optimizer, saved: dict) -> None:
    """Load optimizer state but keep this machine's kernel choice (fused/foreach)."""
    keep = [{k: g.get(k) for k in ("fused", "foreach", "capturable")} for g in optimizer.param_groups]
    saved = dict(saved)
    saved["param_groups"] = [dict(g, betas=tuple(g["betas"])) for g in saved["param_groups"]]
    optimizer.load_state_dict(saved)
    for g, k in zip(optimizer.param_groups, keep):
        g.update(k)


def _truncate_log(log_path: Path, update: int) -> None:
    """Drop log rows past the resumed update (they belong to work that was lost)."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("update", 0) <= update]
    atomic_write_text(log_path, "".join(line + "\n" for line in kept))


def read_train_log(save_dir: str | os.PathLike) -> list[dict]:
    path = Path(save_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


