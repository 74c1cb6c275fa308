"""Checkpoints: fairseq's format, written so that they load without pickle.

A checkpoint is the dict fairseq's ``checkpoint_utils`` reads::

    {"model": state_dict, "cfg": FairseqConfig as a plain dict, "args": None,
     "optimizer_history": [{"criterion_name", "optimizer_name", "lr_scheduler_state",
                            "num_updates"}],
     "last_optimizer_state": plain dict or None,
     "extra_state": {"num_updates": int, "train_iterator": {...},
                     "btm": {"train_spec": {...}, "dictionary": {"symbols", "counts"},
                             "dict_sha256", "data_state", "best_valid_loss", ...}}}

Only tensors, numbers, strings, lists, dicts and None are inside, so
``torch.load(path, weights_only=True)`` reads it and so does ``fairseq-eval-lm --path``. The
dictionary travels inside the checkpoint so that a model loads without its data directory and
averaging can refuse experts whose vocabularies differ. Every save is atomic and writes a
``.sha256`` sidecar that ``load_checkpoint`` verifies.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.contract.atomic import atomic_path, atomic_write_text, sha256_file
from launcher.contract.errors import BtmError


@dataclass
class LoadedModel:
    model: Any  # a fairseq model (ElmModel), in eval mode, on the requested device
    dictionary: Any  # fairseq.data.Dictionary
    cfg: dict  # the checkpoint's cfg (plain dict)
    sha256: str  # of the checkpoint file


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".sha256")


def save_checkpoint(state: dict, path: str | os.PathLike) -> str:
    """Write ``state`` atomically with its ``.sha256`` sidecar; return the sha256.

    A kill at any moment leaves a checkpoint that verifies against its sidecar. The sidecar is
    updated in two phases around the checkpoint's rename: first it accepts both the file in
    place and the one about to replace it (current hash first, so readers that take the first
    hash stay right), then, after the rename, only the new one.
    """
    path = Path(path)
    side = sidecar_path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
            digest = sha256_file(tmp)
            current = _current_hash(path)
            if current is not None:
                atomic_write_text(side, f"{current}  {path.name}\n{digest}  {path.name} (pending)\n")
    except RuntimeError as e:  # torch's zip writer reports a full disk as "unexpected pos"
        import shutil

        free = shutil.disk_usage(path.parent).free
        raise BtmError(f"could not write checkpoint {path}: {str(e).splitlines()[0]} "
                       f"({free} bytes free on its filesystem: is the disk full?); the previous "
                       f"{path.name}, if any, is untouched") from e
    atomic_write_text(side, f"{digest}  {path.name}\n")
    return digest


def read_sidecar_hashes(path: str | os.PathLike) -> list[str]:
    """The hashes the sidecar accepts, current first (two only in the middle of a save)."""
    side = sidecar_path(path)
    if not side.exists():
        return []
    return [line.split()[0] for line in side.read_text().splitlines() if line.strip()]


def _current_hash(path: Path) -> str | None:
    """The sha256 of the checkpoint now at ``path``, from its sidecar where that is unambiguous."""
    if not path.is_file():
        return None
    hashes = read_sidecar_hashes(path)
    if len(hashes) == 1:
        return hashes[0]
    if not hashes:
        return None  # no sidecar: nothing to keep consistent
    return sha256_file(path)  # a save was killed mid-way: which of the two is in place?


def verify_checkpoint(path: str | os.PathLike) -> str:
    """Return the file's sha256, raising BtmError when its sidecar does not accept it."""
    path = Path(path)
    if not path.is_file():
        raise BtmError(f"checkpoint not found: {path}")
    digest = sha256_file(path)
    accepted = read_sidecar_hashes(path)
    if accepted and digest not in accepted:
        raise BtmError(f"checkpoint {path} does not match its sidecar {sidecar_path(path)} "
                       f"(sha256 {digest[:12]}... != {accepted[0][:12]}...): the file is corrupt "
                       "or was replaced without its sidecar")
    return digest


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False, *,
                    mmap: bool = False, verify: bool = True) -> dict:
    """Load a checkpoint dict on CPU with ``weights_only=True``.

    A file that needs pickle (e.g. an old fairseq checkpoint holding an argparse Namespace)
    is refused unless ``trust_pickle`` (the CLI's ``--trust-checkpoint``). ``mmap`` maps the
    tensors instead of reading them (averaging streams checkpoints this way).
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    elif not path.is_file():
        raise BtmError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise BtmError(
                f"checkpoint {path} needs pickle to load (it holds Python objects, not just "
                "tensors and plain data); pickle can run arbitrary code, so btm refuses it. "
                "If you trust this file, pass --trust-checkpoint (btm branch, train, eval, "
                "average, export; trust_checkpoint=true in the lm_eval btm model's model_args), "
                "or convert it once into a safe checkpoint with "
                f"`btm branch --from {path} --trust-checkpoint --out NEW.pt`") from e
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError) as e:
        raise BtmError(f"checkpoint {path} cannot be read: {e}") from e


def num_updates(state: dict) -> int:
    return int(state.get("extra_state", {}).get("num_updates", 0) or 0)


def btm_state(state: dict) -> dict:
    return (state.get("extra_state") or {}).get("btm") or {}


# -- building the cfg and the model ------------------------------------------------------------

def make_cfg(model_cfg, task_cfg, *, seed: int = 1, optimizer: dict | None = None) -> dict:
    """A FairseqConfig as a plain dict, with ``model`` and ``task`` filled from dataclasses."""
    from omegaconf import OmegaConf, open_dict
    from fairseq.dataclass.configs import FairseqConfig

    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.common.seed = seed
        cfg.model = OmegaConf.structured(model_cfg)
        cfg.task = OmegaConf.structured(task_cfg)
        cfg.task.seed = seed
        if cfg.task.get("_name") is None:
            cfg.task._name = "multidomain_lm"
        cfg.criterion = {"_name": "cross_entropy"}
        cfg.optimizer = optimizer or {"_name": "adam"}
        cfg.lr_scheduler = {"_name": "polynomial_decay"}
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return _plainify(plain)


def _plainify(obj):
    """Tuples -> lists, enums -> str, recursively (weights_only-safe containers only)."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, int) else str(k)): _plainify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plainify(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    return str(obj)


def dictionary_to_state(dictionary) -> dict:
    from fairseq_ext.encoders import special_ids_of

    return {"symbols": list(dictionary.symbols), "counts": [int(c) for c in dictionary.count],
            "special_ids": special_ids_of(dictionary)}


def dictionary_from_state(state: dict):
    from fairseq.data import Dictionary

    d = Dictionary()
    d.symbols, d.count, d.indices = [], [], {}
    for sym, count in zip(state["symbols"], state["counts"]):
        d.indices[sym] = len(d.symbols)
        d.symbols.append(sym)
        d.count.append(count)
    d.nspecial = 4
    if state.get("special_ids"):  # an hf tokenizer's roles (fairseq_ext.encoders); else fairseq's
        from fairseq_ext.encoders import set_special_ids

        set_special_ids(d, state["special_ids"])
    return d


def checkpoint_dictionary(state: dict, path: str | os.PathLike = "?"):
    """The Dictionary stored in a btm checkpoint, else DATA/dict.txt of its task cfg."""
    from fairseq_ext.encoders import load_dictionary

    stored = btm_state(state).get("dictionary")
    if stored:
        return dictionary_from_state(stored)
    data = ((state.get("cfg") or {}).get("task") or {}).get("data")
    if data and os.path.isfile(os.path.join(str(data).split(":")[0], "dict.txt")):
        return load_dictionary(str(data).split(":")[0])
    raise BtmError(f"checkpoint {path} holds no dictionary and its data dir {data!r} has no "
                   "dict.txt")


class _TaskShim:
    """What ``build_model`` needs from a task: the dictionaries."""

    def __init__(self, dictionary):
        self.source_dictionary = self.target_dictionary = self.dictionary = dictionary


def build_model_from_cfg(model_cfg: dict, dictionary):
    from omegaconf import OmegaConf
    from fairseq import models
    from fairseq_ext.registry import register_all

    register_all()
    return models.build_model(OmegaConf.create(model_cfg), _TaskShim(dictionary))


def load_model(path: str | os.PathLike, device="cpu", *, trust_pickle: bool = False) -> LoadedModel:
    """Build the checkpoint's model (from its cfg), load its weights, eval mode, on ``device``."""
    sha = verify_checkpoint(path)
    state = load_checkpoint(path, trust_pickle=trust_pickle, verify=False)
    cfg = state.get("cfg")
    if not cfg or not cfg.get("model"):
        raise BtmError(f"checkpoint {path} has no model cfg (key 'cfg.model')")
    dictionary = checkpoint_dictionary(state, path)
    model = build_model_from_cfg(cfg["model"], dictionary)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise BtmError(f"checkpoint {path}: weights do not fit its model cfg: {e}") from e
    model.to(device).eval()
    return LoadedModel(model=model, dictionary=dictionary, cfg=cfg, sha256=sha)


def make_state(model_state: dict, cfg: dict, dictionary, *, num_updates: int = 0,
               optimizer_state: dict | None = None, lr_scheduler_state: dict | None = None,
               optimizer_name: str = "AdamW", btm: dict | None = None) -> dict:
    """Assemble a checkpoint dict in fairseq's layout (see the module docstring)."""
    btm = dict(btm or {})
    btm["dictionary"] = dictionary_to_state(dictionary)
    return {
        "model": model_state,
        "cfg": cfg,
        "args": None,
        "optimizer_history": [{
            "criterion_name": "CrossEntropyCriterion",
            "optimizer_name": optimizer_name,
            "lr_scheduler_state": lr_scheduler_state or {"best": None},
            "num_updates": int(num_updates),
        }],
        "last_optimizer_state": optimizer_state,
        "extra_state": {
            "num_updates": int(num_updates),
            "train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True},
            "btm": btm,
        },
    }
