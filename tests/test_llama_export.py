"""``btm export hf`` of Llama-layout ELM checkpoints -> transformers ``LlamaForCausalLM``.

Real parts only, as tests/test_export_hf.py for GPT-2: the real `btm data prepare` output,
Llama-layout checkpoints with every parameter perturbed (so that a wrong rename, a swapped
gate/up or a rotary convention mismatch shows), a non-default rope_theta, GQA, the real btm
scorer and real transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval_fixtures import tiny_data  # noqa: F401
from launcher.contract.errors import BtmError
from test_export_hf import _transformers, hf_block_logprobs

pytestmark = pytest.mark.fairseq


def make_llama_expert(data_dir: Path, out: Path, *, seed: int, tie: bool,
                      positions: int = 96) -> Path:
    """A 2-layer Llama-layout checkpoint (4 query heads, 2 kv heads) with random parameters."""
    import torch
    from fairseq.data import Dictionary

    from fairseq_ext.checkpoint import build_model_from_cfg, make_cfg, make_state, save_checkpoint
    from fairseq_ext.models.llama import llama_config_for_preset
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig

    if out.exists():
        return out
    torch.manual_seed(seed)
    dictionary = Dictionary.load(str(data_dir / "dict.txt"))
    model_cfg = llama_config_for_preset("llama-tiny", decoder_embed_dim=32, decoder_ffn_embed_dim=48,
                                        max_target_positions=positions, rope_theta=2000.0,
                                        rms_norm_eps=1e-6, tie_embeddings=tie)
    model_cfg._name = "llama_tiny"
    cfg = make_cfg(model_cfg, MultidomainLMConfig(data=str(data_dir)))
    model = build_model_from_cfg(cfg["model"], dictionary)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(make_state(model.state_dict(), cfg, dictionary), out)
    return out


@pytest.fixture
def llama_experts(tiny_data, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    out = tmp_path_factory.getbasetemp() / "llama_experts"
    out.mkdir(exist_ok=True)
    return {name: make_llama_expert(tiny_data, out / f"{name}.pt", seed=i, tie=tie)
            for i, (name, tie) in enumerate([("untied", False), ("tied", True)])}


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_exports_as_llama_with_scorer_logprobs(tiny_data, llama_experts, name, tmp_path):  # noqa: F811
    import torch

    from fairseq_ext.export_hf import export_hf
    from fairseq_ext.scoring import ContextSettings, read_split, score_split

    transformers = _transformers()
    out = tmp_path / "hf"
    record = export_hf(llama_experts[name], out)
    assert record["vocab_size"] == 400
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=False, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size) == (2, 32, 4, 2, 48)
    assert cfg.rms_norm_eps == 1e-6 and cfg.vocab_size == 400
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == (name == "tied")
    stored = json.loads((out / "config.json").read_text())
    assert stored["rope_theta"] == 2000.0 and stored["tie_word_embeddings"] == (name == "tied")

    ctx = ContextSettings(max_docs=3)  # blocks of the model's 96 positions, one stream per doc
    btm = score_split(llama_experts[name], tiny_data, "code_python", "valid", cache_dir=tmp_path,
                      context=ctx)
    tokens, starts = read_split(tiny_data, "code_python", "valid", max_docs=3)
    assert len(tokens) > 3 * 96
    hf = hf_block_logprobs(model, tokens, starts, 96)
    np.testing.assert_allclose(hf, btm.logprobs, atol=1e-4, rtol=0)
    assert btm.logprobs.std() > 0.1  # a real, non-trivial model


def test_average_and_forest_export(tiny_data, llama_experts, tmp_path):  # noqa: F811
    import torch

    from fairseq_ext.averaging import average_checkpoints
    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.export_hf import export_hf

    transformers = _transformers()
    second = make_llama_expert(tiny_data, tmp_path / "second.pt", seed=7, tie=False)
    average_checkpoints([llama_experts["untied"], second], [0.3, 0.7], tmp_path / "avg.pt")
    forest = tmp_path / "forest"
    forest.mkdir()
    for name, ckpt in (("one", llama_experts["untied"]), ("avg", tmp_path / "avg.pt")):
        (forest / f"{name}.pt").write_bytes(ckpt.read_bytes())
    index = export_hf(forest, tmp_path / "hf")
    assert sorted(index["experts"]) == ["avg", "one"]
    ids = torch.tensor([[2] + list(range(10, 90))])
    elm = load_model(tmp_path / "avg.pt").model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "avg",
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        a = torch.log_softmax(elm(ids)[0].float(), -1)
        b = torch.log_softmax(hf(ids).logits.float(), -1)
    assert float((a - b).abs().max()) < 1e-4


def test_unknown_parameter_is_refused(llama_experts, tmp_path):
    import torch

    from fairseq_ext.checkpoint import load_checkpoint, save_checkpoint
    from fairseq_ext.export_hf import export_hf

    state = load_checkpoint(llama_experts["tied"])
    state["model"]["decoder.output_projection.weight"] = torch.zeros(400, 32)  # tied: no head
    save_checkpoint(state, tmp_path / "odd.pt")
    with pytest.raises(BtmError, match="decoder.output_projection.weight"):
        export_hf(tmp_path / "odd.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
