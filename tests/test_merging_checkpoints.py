"""Merging real (tiny) checkpoints: the driver applies each method to every parameter, keeps
keys, shapes and dtypes, finds the base in the experts' branch records, and refuses bad input
with errors that name the culprit."""
import warnings

import numpy as np
import pytest

from conftest import require_fairseq

pytestmark = pytest.mark.fairseq

METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "model_stock"]


def _dictionary(symbols="abcdefghijklmnopqrstuvwxyz"):
    from fairseq.data import Dictionary

    d = Dictionary()
    for s in symbols:
        d.add_symbol(s)
    d.finalize(padding_factor=8)
    return d


def _save(path, state_dict, dictionary=None, **overrides):
    """``state_dict`` saved as a btm checkpoint of a tiny ELM (its cfg from ``overrides``)."""
    from fairseq_ext import checkpoint as ck
    from fairseq_ext.models.elm import elm_config_for_preset
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig

    cfg = elm_config_for_preset("tiny", **overrides)
    cfg._name = "elm_tiny"
    state = ck.make_state(state_dict, ck.make_cfg(cfg, MultidomainLMConfig(data="none")),
                          dictionary or _dictionary())
    ck.save_checkpoint(state, path)
    return state_dict


def _model(seed, dictionary=None, **overrides):
    import torch
    from fairseq_ext.models.elm import ElmDecoder, ElmModel, elm_config_for_preset
    from fairseq_ext.registry import register_all

    register_all()
    torch.manual_seed(seed)
    cfg = elm_config_for_preset("tiny", **overrides)
    cfg._name = "elm_tiny"
    return ElmModel(ElmDecoder(cfg, dictionary or _dictionary())).state_dict()


def _perturbed(sd, seed, scale=0.05):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in sd.items()}


@pytest.fixture(scope="module")
def forest(tmp_path_factory):
    """A seed and three experts branched from it (branch.json beside each), like a btm run."""
    require_fairseq()
    from fairseq_ext.branch import branch_expert

    root = tmp_path_factory.mktemp("forest")
    seed_sd = _save(root / "seed" / "checkpoint_last.pt", _model(0))
    shared = _perturbed(seed_sd, 1)  # a drift all experts share, so their task vectors correlate
    experts = []
    for i in range(3):
        d = root / f"e{i}"
        branch_expert(root / "seed" / "checkpoint_last.pt", d / "init.pt", method="seed")
        _save(d / "checkpoint_last.pt", _perturbed(shared, 10 + i))
        experts.append(d / "checkpoint_last.pt")
    return {"root": root, "seed": root / "seed" / "checkpoint_last.pt", "experts": experts}


def _tensors(path):
    from fairseq_ext.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_merges_every_parameter(forest, tmp_path, method):
    from fairseq_ext.merging import get_method, make_params, merge_checkpoints, tensor_generator

    weights = [0.5, 0.3, 0.2]
    res = merge_checkpoints(forest["experts"], weights, tmp_path / "m.pt", method=method,
                            seed=3, safetensors_path=tmp_path / "m.safetensors")
    rule = get_method(method)
    assert res["base"] == (str(forest["seed"]) if rule.needs_base else None)
    out, base = _tensors(tmp_path / "m.pt"), _tensors(forest["seed"])
    experts = [_tensors(p) for p in forest["experts"]]
    assert list(out) == list(experts[0])
    for k, t in out.items():
        assert t.shape == experts[0][k].shape and t.dtype == experts[0][k].dtype, k
        assert bool(t.isfinite().all()), k
        want = rule.merge(base[k].float() if rule.needs_base else None,
                          [e[k].clone().float() for e in experts], res["weights"], make_params(rule),
                          tensor_generator(3, k))
        assert np.array_equal(t.numpy(), want.numpy()), k
    if method != "linear":  # a real merge, not one of the inputs
        k = "decoder.layers.0.mlp.c_fc.weight"
        assert not any(np.array_equal(out[k].numpy(), e[k].numpy()) for e in [base, *experts])
    from safetensors.torch import load_file
    assert all(np.array_equal(v.numpy(), out[k].numpy())
               for k, v in load_file(str(tmp_path / "m.safetensors")).items())


def test_merged_checkpoint_loads_as_a_model_and_records_how(forest, tmp_path):
    from fairseq_ext.checkpoint import btm_state, load_checkpoint, load_model
    from fairseq_ext.merging import merge_checkpoints

    merge_checkpoints(forest["experts"], [1, 1, 1], tmp_path / "m.pt", method="ties",
                      params={"density": 0.5}, seed=4)
    info = btm_state(load_checkpoint(tmp_path / "m.pt"))["merge"]
    assert info["method"] == "ties" and info["params"] == {"density": 0.5, "lambda_": 1.0}
    assert info["seed"] == 4 and info["base"]["path"] == str(forest["seed"])
    assert load_model(tmp_path / "m.pt").model is not None


def test_dare_reproduces_and_depends_on_the_seed(forest, tmp_path):
    from fairseq_ext.merging import merge_checkpoints

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        merge_checkpoints(forest["experts"], [1, 1, 1], tmp_path / f"{name}.pt",
                          method="dare_ties", seed=seed)
    a, b, c = (_tensors(tmp_path / f"{n}.pt") for n in "abc")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not all(np.array_equal(a[k].numpy(), c[k].numpy()) for k in a)


def test_zero_weight_experts_take_no_part(forest, tmp_path):
    from fairseq_ext.merging import merge_checkpoints

    merge_checkpoints(forest["experts"], [1, 0, 1], tmp_path / "a.pt", method="ties")
    merge_checkpoints([forest["experts"][0], forest["experts"][2]], [1, 1], tmp_path / "b.pt",
                      method="ties")
    a, b = _tensors(tmp_path / "a.pt"), _tensors(tmp_path / "b.pt")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_dtype_is_kept(forest, tmp_path):
    from fairseq_ext.merging import merge_checkpoints

    half = []
    for i, p in enumerate(forest["experts"][:2]):
        half.append(tmp_path / f"h{i}.pt")
        _save(half[-1], {k: v.half() for k, v in _tensors(p).items()})
    seed_half = tmp_path / "seed_half.pt"
    _save(seed_half, {k: v.half() for k, v in _tensors(forest["seed"]).items()})
    merge_checkpoints(half, [1, 1], tmp_path / "m.pt", method="ties", base=seed_half)
    import torch
    assert {t.dtype for t in _tensors(tmp_path / "m.pt").values()} == {torch.float16}


def test_base_not_the_recorded_parent_warns_naming_it(forest, tmp_path):
    from fairseq_ext.merging import merge_checkpoints

    other = tmp_path / "other.pt"
    _save(other, _model(99))
    with pytest.warns(UserWarning, match=r"other\.pt is not the recorded parent of expert .*e0.*"
                                         r"names .*seed.checkpoint_last\.pt"):
        res = merge_checkpoints(forest["experts"], [1, 1, 1], tmp_path / "m.pt",
                                method="task_arithmetic", base=other)
    assert res["base"] == str(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded parent itself: no warning
        merge_checkpoints(forest["experts"], [1, 1, 1], tmp_path / "m.pt",
                          method="task_arithmetic", base=forest["seed"])


def test_base_of_a_posterior_branch_is_its_averaged_init(forest, tmp_path):
    """Experts branched from several weighted parents: the base is the averaged init.pt."""
    from fairseq_ext.branch import branch_expert
    from fairseq_ext.merging import merge_checkpoints
    from launcher.contract.errors import BtmError

    parents = {str(forest["experts"][0]): 0.7, str(forest["experts"][1]): 0.3}
    grown = []
    for i, parent_weights in enumerate([parents, parents, {str(forest["seed"]): 1.0}]):
        d = tmp_path / f"g{i}"
        branch_expert(parent_weights, d / "init.pt", method="posterior")
        _save(d / "checkpoint_last.pt", _perturbed(_tensors(d / "init.pt"), 20 + i))
        grown.append(d / "checkpoint_last.pt")
    res = merge_checkpoints(grown[:2], [1, 1], tmp_path / "m.pt", method="ties")
    assert res["base"] == str(tmp_path / "g0" / "init.pt")
    with pytest.raises(BtmError, match=r"g0.checkpoint_last\.pt and .*g2.checkpoint_last\.pt "
                                        r"branched from different parents"):
        merge_checkpoints([grown[0], grown[2]], [1, 1], tmp_path / "m.pt", method="ties")


def test_refuses_bad_inputs(forest, tmp_path):
    from fairseq_ext.merging import merge_checkpoints
    from launcher.contract.errors import BtmError

    experts, out = forest["experts"], tmp_path / "o.pt"
    a, b = experts[:2]
    for weights, msg in (([-1, 2], "negative"), ([0, 0], "all weights are zero")):
        with pytest.raises(BtmError, match=msg):
            merge_checkpoints([a, b], weights, out, method="ties")
    with pytest.raises(BtmError, match=r"density must be in \(0, 1\]"):
        merge_checkpoints([a, b], [1, 1], out, method="dare_ties", params={"density": 1.2})
    with pytest.raises(BtmError, match="did you mean 'dare_linear'"):
        merge_checkpoints([a, b], [1, 1], out, method="dare_lienar")
    wide = tmp_path / "wide.pt"
    _save(wide, _model(2, decoder_ffn_embed_dim=128), decoder_ffn_embed_dim=128)
    with pytest.raises(BtmError, match=r"e0.checkpoint_last\.pt and .*wide\.pt.*decoder_ffn_embed_dim"):
        merge_checkpoints([a, wide], [1, 1], out, method="ties", base=forest["seed"])
    other_vocab = _dictionary("abcdefghijklmnopqrstuvwxyz0123456789")
    odd = tmp_path / "odd.pt"
    _save(odd, _model(3, dictionary=other_vocab), dictionary=other_vocab)
    with pytest.raises(BtmError, match=r"odd\.pt.*different dictionaries"):
        merge_checkpoints([a, odd], [1, 1], out, method="ties", base=forest["seed"])
    with pytest.warns(UserWarning, match="not the recorded parent"), \
            pytest.raises(BtmError, match=r"odd\.pt.*different dictionaries"):
        merge_checkpoints([a, b], [1, 1], out, method="ties", base=odd)
    loose = tmp_path / "loose.pt"  # no branch.json beside it
    _save(loose, _perturbed(_tensors(a), 5))
    with pytest.raises(BtmError, match=r"loose\.pt has no branch\.json.*give the base"):
        merge_checkpoints([a, loose], [1, 1], out, method="model_stock")
    with pytest.raises(BtmError, match="'linear' takes no base model"):
        merge_checkpoints([a, b], [1, 1], out, method="linear", base=forest["seed"])
    nan = tmp_path / "nan.pt"
    bad = _tensors(a)
    bad["decoder.ln_f.bias"][0] = float("nan")
    _save(nan, bad)
    with pytest.raises(BtmError, match=r"'decoder\.ln_f\.bias' has NaN/inf"):
        merge_checkpoints([a, nan], [1, 1], out, method="linear")
    assert not out.exists()
