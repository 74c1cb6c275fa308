"""The lm-eval `btm` model runs a MoE checkpoint (either layout) as one model: its option scores
are the MoE's own log-probs of the continuation."""
from __future__ import annotations

import pytest

from eval_fixtures import tiny_data  # noqa: F401
from test_lm_eval_btm import PAIRS, Req, _lm_eval

pytestmark = pytest.mark.fairseq


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_lm_eval_btm_model_scores_a_moe_checkpoint(tiny_data, tmp_path, preset):  # noqa: F811
    import torch

    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.data_prep import encode_text
    from fairseq_ext.moe.build import MoeSpec, build_moe
    from fairseq_ext.moe.router_init import RouterSample
    from test_moe_build import make_dense

    module = _lm_eval()
    domains = ["bible", "code_python", "legal"]
    experts = {d: make_dense(tiny_data, tmp_path / f"{d}.pt", preset, seed=i) for i, d in enumerate(domains)}
    build_moe(experts, tmp_path / "moe.pt",
              MoeSpec(router_init="data", router_sample=RouterSample(str(tiny_data), domains, max_tokens=500)))
    lm = module.BtmLM(data_dir=str(tiny_data), checkpoint=str(tmp_path / "moe.pt"))
    got = lm.loglikelihood([Req(c, x) for c, x in PAIRS if c], disable_tqdm=True)
    model = load_model(tmp_path / "moe.pt").model
    for (context, continuation), (ll, _) in zip([p for p in PAIRS if p[0]], got):
        stripped = context.rstrip()  # lm_eval moves trailing whitespace into the continuation
        continuation = context[len(stripped):] + continuation
        whole = encode_text(tiny_data, stripped + continuation)
        n = len(whole) - len(encode_text(tiny_data, stripped))
        doc = [2] + whole
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([doc[:-1]]))[0][0].float(), -1)
        expected = lp.gather(1, torch.tensor(whole)[:, None])[-n:, 0].sum()
        assert ll == pytest.approx(float(expected), abs=1e-4)
