"""Forest -> MoE (fairseq_ext/moe): the built model's parameters come from the right experts,
a MoE of identical experts scores exactly like one of them, the router starts from zero or from
data, the load-balancing loss joins the training loss, and bad forests are refused naming the
expert."""
from __future__ import annotations

import numpy as np
import pytest

from eval_fixtures import tiny_data  # noqa: F401

pytestmark = pytest.mark.fairseq


def make_dense(data_dir, out, preset="tiny", seed=0, **overrides):
    """A real dense checkpoint of ``preset``'s layout at random init (``seed``), on the data's
    dictionary, with short positions so the tests stay small."""
    import torch
    from fairseq.data import Dictionary

    from fairseq_ext import checkpoint as ck
    from fairseq_ext.models.preset_config import model_config_for_preset
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig
    from launcher.contract.presets import PRESETS

    torch.manual_seed(seed)
    dictionary = Dictionary.load(str(data_dir / "dict.txt"))
    model_cfg = model_config_for_preset(preset, **{"max_target_positions": 64, **overrides})
    model_cfg._name = PRESETS[preset].arch
    cfg = ck.make_cfg(model_cfg, MultidomainLMConfig(data=str(data_dir)))
    model = ck.build_model_from_cfg(cfg["model"], dictionary)
    ck.save_checkpoint(ck.make_state(model.state_dict(), cfg, dictionary), out)
    return out


def tensors(path):
    from fairseq_ext.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


@pytest.fixture(params=["tiny", "llama-tiny"])
def forest(request, tiny_data, tmp_path):
    return {name: make_dense(tiny_data, tmp_path / f"{name}.pt", request.param, seed=i)
            for i, name in enumerate(["bible", "code_python", "legal"])}


def test_ffns_are_copied_per_slot_and_the_rest_is_averaged_with_the_weights(forest, tmp_path):
    import torch

    from fairseq_ext.moe.build import MoeSpec, build_moe

    weights = [0.5, 0.3, 0.2]
    info = build_moe(forest, tmp_path / "moe.pt", MoeSpec(weights=weights))
    moe, dense = tensors(tmp_path / "moe.pt"), [tensors(p) for p in forest.values()]
    assert [e["name"] for e in info["experts"]] == list(forest)
    ffn_keys = [k for k in dense[0] if ".mlp." in k]
    assert ffn_keys
    for j, expert in enumerate(dense):
        for key in ffn_keys:
            slot = key.replace(".mlp.", f".mlp.experts.{j}.")
            assert torch.equal(moe[slot], expert[key])
    for key in (k for k in dense[0] if ".mlp." not in k):
        expected = sum(w * e[key] for w, e in zip(weights, dense))
        torch.testing.assert_close(moe[key], expected, rtol=0, atol=1e-6)
    routers = [k for k in moe if k.endswith("router.weight")]
    assert len(routers) == 2 and all(not moe[k].any() for k in routers)
    assert set(moe) == {*(k for k in dense[0] if ".mlp." not in k), *routers,
                        *(k.replace(".mlp.", f".mlp.experts.{j}.")
                          for j in range(3) for k in ffn_keys)}


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_a_moe_of_identical_experts_scores_exactly_like_one_expert(preset, tiny_data, tmp_path):
    import shutil

    from fairseq_ext.moe.build import MoeSpec, build_moe
    from fairseq_ext.scoring import score_split

    one = make_dense(tiny_data, tmp_path / "one.pt", preset, seed=3)
    for name in ("b", "c"):
        shutil.copy(one, tmp_path / f"{name}.pt")
        shutil.copy(str(one) + ".sha256", str(tmp_path / f"{name}.pt") + ".sha256")
    experts = {"a": one, "b": tmp_path / "b.pt", "c": tmp_path / "c.pt"}
    build_moe(experts, tmp_path / "moe.pt", MoeSpec(top_k=2))
    expert = score_split(one, tiny_data, "legal", "valid", cache_dir=tmp_path / "scores")
    moe = score_split(tmp_path / "moe.pt", tiny_data, "legal", "valid", cache_dir=tmp_path / "scores")
    np.testing.assert_allclose(moe.logprobs, expert.logprobs, rtol=0, atol=1e-5)


def test_a_data_started_router_sends_each_domain_mostly_to_its_own_expert(forest, tiny_data,
                                                                          tmp_path):
    """Row j of each router is expert j's mean FFN input on its own domain (unit length), so a
    domain's tokens prefer the expert whose sample they resemble."""
    import torch

    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from fairseq_ext.moe.router_init import RouterSample, mean_ffn_inputs

    sample = RouterSample(str(tiny_data), list(forest), max_tokens=2000)
    build_moe(forest, tmp_path / "moe.pt", MoeSpec(router_init="data", router_sample=sample))
    moe = tensors(tmp_path / "moe.pt")
    for j, (name, path) in enumerate(forest.items()):
        means = mean_ffn_inputs(path, name, sample)
        for layer in range(2):
            row = moe[f"decoder.layers.{layer}.mlp.router.weight"][j]
            torch.testing.assert_close(row, means[layer] / means[layer].norm())
    model = load_model(tmp_path / "moe.pt").model
    assert model.decoder.cfg.moe_experts == 3 and model.decoder.cfg.moe_top_k == 2


def test_the_load_balancing_loss_is_added_in_training_only(forest, tmp_path):
    import torch

    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.moe.build import MoeSpec, build_moe

    build_moe(forest, tmp_path / "moe.pt", MoeSpec(aux_loss_coef=0.5, train="router"))
    model = load_model(tmp_path / "moe.pt").model
    tokens = torch.randint(4, 100, (2, 32))
    plain = model.lm_loss(tokens, tokens)
    model.train()
    with_aux = model.lm_loss(tokens, tokens)
    aux = torch.stack([b.last_aux_loss for b in model.moe_blocks()]).mean()
    # A zero router routes uniformly: every expert's probability is 1/N, so the loss is about 1.
    assert 0.9 < float(aux.detach()) < 1.5
    torch.testing.assert_close(with_aux, plain + 0.5 * aux * tokens.numel())
    with_aux.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"decoder.layers.{i}.mlp.router.weight" for i in range(2)}


def test_bad_forests_are_refused_naming_the_expert(tiny_data, tmp_path):
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from launcher.contract.errors import BtmError

    a = make_dense(tiny_data, tmp_path / "a.pt", seed=0)
    b = make_dense(tiny_data, tmp_path / "b.pt", seed=1)
    wide = make_dense(tiny_data, tmp_path / "wide.pt", seed=2, decoder_ffn_embed_dim=128)
    llama = make_dense(tiny_data, tmp_path / "llama.pt", "llama-tiny", seed=3)
    out = tmp_path / "moe.pt"
    cases = [
        ({"a": a}, MoeSpec(), "at least 2 experts.*a"),
        ({"a": a, "b": b}, MoeSpec(top_k=3), "top_k is 3.*2 experts.*a, b"),
        ({"a": a, "wide": wide}, MoeSpec(), "expert 'wide'.*ffn"),
        ({"a": a, "llama": llama}, MoeSpec(), "expert 'llama'.*architecture"),
        ({"a": a, "gone": tmp_path / "gone.pt"}, MoeSpec(), "expert 'gone' not found"),
        ({"a": a, "b": b}, MoeSpec(train="experts"), "moe_train is 'experts'"),
        ({"a": a, "b": b}, MoeSpec(aux_loss_coef=-1), "moe_aux_loss_coef is -1"),
        ({"a": a, "b": b}, MoeSpec(router_init="random"), "router_init is 'random'"),
        ({"a": a, "b": b}, MoeSpec(router_init="data"), "one sample domain per expert"),
        ({"a": a, "b": b}, MoeSpec(weights=[1.0]), "1 weights given for 2"),
    ]
    for experts, spec, message in cases:
        with pytest.raises(BtmError, match=message):
            build_moe(experts, out, spec)
    tampered = bytearray(b.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF  # no longer matches its sidecar
    b.write_bytes(bytes(tampered))
    with pytest.raises(BtmError, match="expert 'b'.*does not match its sidecar"):
        build_moe({"a": a, "b": b}, out, MoeSpec())
    assert not out.exists()


def test_a_moe_trains_on_two_processes_when_an_expert_gets_no_tokens(tiny_data, tmp_path):  # noqa: F811
    """A zero router breaks its ties the same way for every token, so with top-2 of 3 the third
    expert never gets a token: DDP must not wait for its gradients (two CPU processes, gloo)."""
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from fairseq_ext.multiproc import train_lm_torchrun
    from fairseq_ext.train import TrainSpec

    experts = {n: make_dense(tiny_data, tmp_path / f"{n}.pt", seed=i, max_target_positions=128)
               for i, n in enumerate("abc")}
    build_moe(experts, tmp_path / "moe.pt", MoeSpec(top_k=2, router_init="zero"))
    spec = TrainSpec(data_dir=str(tiny_data), domains=["bible", "legal"], save_dir=str(tmp_path / "run"),
                     preset="tiny", init=str(tmp_path / "moe.pt"), max_updates=2,
                     save_interval_updates=2, tokens_per_batch=1024, device="cpu", compile=False,
                     valid_max_tokens=300)
    result = train_lm_torchrun(spec, 2)
    assert result.num_updates == 2 and not result.preempted


def test_inference_speed_times_the_moe_one_expert_and_the_ensemble_on_the_same_blocks(forest, tiny_data,
                                                                                        tmp_path):
    """The rows `btm report` shows as "MoE inference speed": the ratio is against the forest's
    first expert, the ensemble runs every expert, and the rows are a valid inference table.
    No timing is asserted (the values depend on the machine): only what was timed, and that
    a broken row is refused."""
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from fairseq_ext.moe.speed import moe_inference_speed
    from launcher.contract.errors import BtmError
    from launcher.contract.moe_tables import INFERENCE
    from launcher.contract.results import append_results, read_results

    build_moe(forest, tmp_path / "moe.pt", MoeSpec(top_k=2))
    rows = moe_inference_speed(tmp_path / "moe.pt", forest, tiny_data, ["bible", "legal"], "valid",
                               run="r", batches=2, batch_size=2, repeats=2)
    by_model = {r["model"]: r for r in rows}
    assert list(by_model) == ["expert:bible", "moe", "ensemble"]
    assert by_model["expert:bible"]["ratio_to_expert"] == 1.0
    assert by_model["ensemble"]["models_run"] == 3 and by_model["moe"]["models_run"] == 1
    assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] == 2 * 2 * 64
    assert all(r["clock"] == "process CPU" and r["tokens_per_s"] > 0 for r in rows)

    table = append_results(tmp_path / "run", rows, INFERENCE)
    assert table.equals(read_results(tmp_path / "run", INFERENCE))
    with pytest.raises(BtmError, match="inference: column 'seconds' row 0 must be positive"):
        append_results(tmp_path / "run", [{**rows[0], "seconds": 0.0}], INFERENCE)


def test_evaluating_a_moe_whose_experts_left_the_forest_names_them(forest, tmp_path):
    """Its speed is measured against the forest's checkpoints of its slots' experts, so an
    expert removed from forest.json since the build is one clear error, before any scoring."""
    from fairseq_ext.evaluate import EvalSettings
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from launcher.contract.errors import BtmError
    from launcher.contract.forest import Forest, verified_checkpoints
    from launcher.contract.layout import RunLayout
    from launcher.stages.evaluation import evaluate_moe

    build_moe(forest, tmp_path / "moe.pt", MoeSpec())
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    kept = Forest(run="run", path=layout.forest)
    kept.add("bible", ["bible"], forest["bible"])
    kept.save()
    with pytest.raises(BtmError, match=r"forest.json has no expert 'code_python', 'legal', which the MoE"):
        evaluate_moe(layout, tmp_path / "moe.pt", verified_checkpoints(layout.forest), ["bible"], EvalSettings(),
                     experts=list(forest))
    assert not layout.results.exists()
