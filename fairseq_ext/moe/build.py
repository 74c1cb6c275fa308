"""Forest -> one MoE checkpoint (Branch-Train-MiX), streamed one expert at a time.

Each expert checkpoint is memory-mapped and read once, in forest order: its FFN parameters are
copied into slot j of every layer's MoE block, everything else (embeddings, attention, norms,
the untied output projection) is added with the expert's weight into float32 accumulators, and,
for a router started from data, the expert's mean FFN inputs on its own domain are computed
(router_init.py) before the next expert is read. Peak memory is therefore the MoE's own
parameters plus one dense model of accumulators plus one expert, whatever N.

Refused, each with a BtmError naming the expert or the setting: fewer than two experts, top_k
outside 1..N, experts of different architectures, shapes or dictionaries, a missing checkpoint
or one that no longer matches its sha256 sidecar, MoE settings that do not describe a model, a
router sample without one domain per expert. The output is checked before it is written: the
keys and shapes of the MoE model its cfg builds, finite values.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from launcher.contract.errors import BtmError

ROUTER_INITS = ("zero", "data")
_FFN_KEY = re.compile(r"^(decoder\.layers\.\d+\.mlp)\.(.+)$")


@dataclass
class MoeSpec:
    """How to build the MoE. ``weights``: one per expert for the averaged parameters (None =
    uniform; normalized); ``router_sample``: where the data-started router reads (router_init
    ``data`` only)."""

    top_k: int = 2
    router_init: str = "zero"
    aux_loss_coef: float = 0.01
    train: str = "all"
    weights: list[float] | None = None
    router_sample: object | None = None  # router_init.RouterSample


def build_moe(experts: dict[str, str | os.PathLike], out_path, spec: MoeSpec, *,
              trust_pickle: bool = False, btm_extra: dict | None = None) -> dict:
    """Write the MoE of the dense ``experts`` ({name: checkpoint}, in slot order) to ``out_path``.

    Returns ``{"out", "sha256", "layout", "top_k", "router_init", "experts": [{"name", "path",
    "sha256", "weight"}]}`` (also saved in the checkpoint's ``extra_state.btm.moe``).
    """
    from fairseq_ext import checkpoint as ck
    from fairseq_ext.merging.compat import normalize_weights

    names, paths = list(experts), [str(p) for p in experts.values()]
    _check_forest(names, paths, spec)
    weights = normalize_weights(spec.weights if spec.weights is not None else [1.0] * len(paths),
                                paths)
    parents = [{"name": n, "path": p, "sha256": _verified(n, p), "weight": w}
               for n, p, w in zip(names, paths, weights)]
    shapes = _check_compatible(names, paths, trust_pickle)
    first = ck.load_checkpoint(paths[0], trust_pickle=trust_pickle, mmap=True, verify=False)
    cfg, dictionary = first["cfg"], ck.checkpoint_dictionary(first, paths[0])
    del first
    layout, model_cfg = _moe_model_cfg(names[0], cfg["model"], len(names), spec)
    tensors = _stream_experts(names, paths, weights, shapes, spec, trust_pickle)
    _check_output(tensors, model_cfg, dictionary, names)

    info = {"layout": layout, "top_k": spec.top_k, "router_init": spec.router_init,
            "experts": parents}
    state = ck.make_state(tensors, dict(cfg, model=model_cfg), dictionary, num_updates=0,
                          btm=dict(btm_extra or {}, moe=info))
    sha = ck.save_checkpoint(state, out_path)
    return {"out": str(out_path), "sha256": sha, **info}


def _check_forest(names: list[str], paths: list[str], spec: MoeSpec) -> None:
    n = len(names)
    if n < 2:
        raise BtmError(f"a MoE needs at least 2 experts; the forest has {n}"
                       + (f" ({names[0]})" if names else ""))
    if not 1 <= spec.top_k <= n:
        raise BtmError(f"moe top_k is {spec.top_k}, but the forest has {n} experts "
                       f"({', '.join(names)}): top_k must be in 1..{n}")
    if spec.router_init not in ROUTER_INITS:
        raise BtmError(f"moe router_init is {spec.router_init!r}: one of {', '.join(ROUTER_INITS)}")
    if spec.router_init == "data":
        sample = spec.router_sample
        if sample is None or len(sample.domains) != n:
            got = "none" if sample is None else f"{len(sample.domains)} domains"
            raise BtmError(f"moe router_init data needs one sample domain per expert "
                           f"({', '.join(names)}); got {got}")
    for name, path in zip(names, paths):
        if not os.path.isfile(path):
            raise BtmError(f"checkpoint of expert {name!r} not found: {path}")


def _verified(name: str, path: str) -> str:
    from fairseq_ext.checkpoint import verify_checkpoint

    try:
        return verify_checkpoint(path)
    except BtmError as e:
        raise BtmError(f"expert {name!r}: {e}") from None


def _check_compatible(names, paths, trust_pickle) -> dict:
    """{key: (shape, dtype)} of the experts, after refusing different architectures."""
    from fairseq_ext.merging.compat import check_compatible

    try:
        return check_compatible(paths, trust_pickle=trust_pickle)["shapes"]
    except BtmError as e:
        culprit = next((n for n, p in zip(names[1:], paths[1:]) if p in str(e)), names[0])
        message = str(e).replace("cannot average", "cannot build a MoE from")
        raise BtmError(f"expert {culprit!r} does not fit the forest's first expert "
                       f"{names[0]!r}: {message}") from None


def _moe_model_cfg(first_name: str, dense: dict, n: int, spec: MoeSpec) -> tuple[str, dict]:
    """(layout, the MoE model cfg as a plain dict) for dense experts of model cfg ``dense``."""
    from fairseq_ext.moe.model import check_settings, moe_config, moe_layout
    from launcher.contract.presets import layout_of_arch

    if moe_layout(dense.get("_name")) is not None:
        raise BtmError(f"expert {first_name!r} is already a MoE model ({dense['_name']}); the "
                       "forest's experts must be dense ELMs")
    layout = layout_of_arch(dense.get("_name"))
    cfg = moe_config(SimpleNamespace(**dense), layout, moe_experts=n, moe_top_k=spec.top_k,
                     moe_aux_loss_coef=spec.aux_loss_coef, moe_train=spec.train)
    try:
        check_settings(cfg)
    except ValueError as e:
        raise BtmError(f"moe settings do not fit the forest of {n} experts: {e}") from None
    return layout, asdict(cfg) | {"_name": cfg._name}


def _stream_experts(names, paths, weights, shapes, spec: MoeSpec, trust_pickle: bool) -> dict:
    """The MoE's tensors: FFNs copied per slot, the rest averaged, the routers; one expert read
    at a time."""
    import torch

    from fairseq_ext.merging.mapped import MappedCheckpoint, keep_large_blocks_in_their_own_mappings
    from fairseq_ext.moe.router_init import mean_ffn_inputs, router_rows

    keep_large_blocks_in_their_own_mappings()
    ffn = {key: _FFN_KEY.match(key) for key in shapes}
    shared = {key: torch.zeros(shape, dtype=torch.float32)
              for key, (shape, _) in shapes.items() if not ffn[key]}
    out, means = {}, []
    for j, (name, path, weight) in enumerate(zip(names, paths, weights)):
        expert = MappedCheckpoint(path, trust_pickle=trust_pickle)
        for key, match in ffn.items():
            tensor = expert.read(key)
            if match:
                out[f"{match.group(1)}.experts.{j}.{match.group(2)}"] = tensor.to(shapes[key][1])
            else:
                shared[key].add_(tensor, alpha=weight)
            del tensor
        del expert  # unmaps the file before the next expert is read
        if spec.router_init == "data":
            means.append(mean_ffn_inputs(path, spec.router_sample.domains[j], spec.router_sample,
                                         trust_pickle=trust_pickle))
    for key, total in shared.items():
        out[key] = total.to(shapes[key][1])
    layers = sorted({m.group(1) for m in ffn.values() if m})
    dim = shapes["decoder.embed_tokens.weight"][0][1]
    rows = router_rows(means) if means else torch.zeros(len(layers), len(names), dim)
    for i, prefix in enumerate(sorted(layers, key=lambda p: int(p.split(".")[2]))):
        out[f"{prefix}.router.weight"] = rows[i].to(shapes["decoder.embed_tokens.weight"][1])
    return out


def _check_output(tensors: dict, model_cfg: dict, dictionary, names) -> None:
    """The MoE model of ``model_cfg`` has exactly these keys and shapes; all values finite."""
    import torch

    from fairseq_ext.checkpoint import build_model_from_cfg

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in
                    build_model_from_cfg(model_cfg, dictionary).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise BtmError(f"internal error: the MoE built from {', '.join(names)} does not match its "
                       f"model (missing {missing[:3]}, unexpected {extra[:3]}, shapes {wrong[:3]})")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BtmError(f"MoE parameter {key!r} has NaN/inf values (check the experts: "
                           f"{', '.join(names)})")


def moe_info(path) -> dict:
    """The build record (``extra_state.btm.moe``: layout, top_k, router_init, experts) of a MoE
    checkpoint written by ``build_moe``."""
    from fairseq_ext.checkpoint import btm_state, load_checkpoint

    info = btm_state(load_checkpoint(Path(path), mmap=True)).get("moe")
    if not info:
        raise BtmError(f"{path} is not a MoE built by btm (no extra_state.btm.moe)")
    return info


def moe_top_k(path) -> int:
    """The ``moe_top_k`` of a MoE checkpoint (built here or trained from one)."""
    from fairseq_ext.checkpoint import load_checkpoint
    from fairseq_ext.moe.model import moe_layout

    model = load_checkpoint(Path(path), mmap=True)["cfg"]["model"]
    if moe_layout(model.get("_name")) is None:
        raise BtmError(f"{path} is not a MoE model (model {model.get('_name')!r})")
    return int(model["moe_top_k"])
