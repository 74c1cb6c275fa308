"""`btm export hf` of MoE checkpoints: a Llama-layout MoE loads as transformers'
MixtralForCausalLM (no remote code) with the btm scorer's log-probs within 1e-4; a GPT-2-layout
MoE is refused with the reason (no transformers class represents it)."""
from __future__ import annotations

import numpy as np
import pytest

from eval_fixtures import tiny_data  # noqa: F401
from launcher.contract.errors import BtmError
from test_export_hf import _transformers, hf_block_logprobs
from test_llama_export import make_llama_expert

pytestmark = pytest.mark.fairseq


@pytest.mark.parametrize("tie", [False, True])
def test_llama_moe_exports_as_mixtral_with_scorer_logprobs(tiny_data, tmp_path, tie):  # noqa: F811
    import torch

    from fairseq_ext.export_hf import export_hf
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from fairseq_ext.moe.router_init import RouterSample
    from fairseq_ext.scoring import ContextSettings, read_split, score_split

    transformers = _transformers()
    domains = ["bible", "code_python", "legal"]
    experts = {d: make_llama_expert(tiny_data, tmp_path / f"{d}.pt", seed=i, tie=tie)
               for i, d in enumerate(domains)}
    sample = RouterSample(str(tiny_data), domains, max_tokens=1000)
    build_moe(experts, tmp_path / "moe.pt", MoeSpec(top_k=2, router_init="data", router_sample=sample))
    out = tmp_path / "hf"
    export_hf(tmp_path / "moe.pt", out)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=False, dtype=torch.float32).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    cfg = model.config
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_key_value_heads) == (3, 2, 2)

    ctx = ContextSettings(max_docs=3)
    btm = score_split(tmp_path / "moe.pt", tiny_data, "code_python", "valid", cache_dir=tmp_path,
                      context=ctx)
    tokens, starts = read_split(tiny_data, "code_python", "valid", max_docs=3)
    hf = hf_block_logprobs(model, tokens, starts, 96)
    np.testing.assert_allclose(hf, btm.logprobs, atol=1e-4, rtol=0)
    assert btm.logprobs.std() > 0.1


def test_gpt2_moe_export_is_refused_with_the_reason(tiny_data, tmp_path):  # noqa: F811
    from fairseq_ext.export_hf import export_hf
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from test_moe_build import make_dense

    experts = {n: make_dense(tiny_data, tmp_path / f"{n}.pt", seed=i) for i, n in enumerate("ab")}
    build_moe(experts, tmp_path / "moe.pt", MoeSpec())
    with pytest.raises(BtmError, match="GPT-2-layout MoE: no transformers class represents"):
        export_hf(tmp_path / "moe.pt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
