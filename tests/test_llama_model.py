"""The Llama-layout ELM (fairseq_ext/models/llama.py): shapes, causality, GQA, tied/untied,
the chunked loss, registration through the checkpoint code, and real training updates."""
import pytest

from conftest import require_fairseq

pytestmark = pytest.mark.fairseq


def _dictionary(n_words: int = 92):
    from fairseq.data import Dictionary

    d = Dictionary()  # 4 specials + n_words
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    return d


def _model(**overrides):
    require_fairseq()
    import torch
    from fairseq_ext.registry import register_all

    register_all()
    from fairseq_ext.models.llama import LlamaElmDecoder, LlamaElmModel, llama_config_for_preset

    torch.manual_seed(0)
    cfg = llama_config_for_preset("llama-tiny", **overrides)
    d = _dictionary()
    return LlamaElmModel(LlamaElmDecoder(cfg, d)).eval(), cfg, d


def test_llama_layout_shapes_and_parameter_count():
    import torch
    from launcher.contract.presets import PRESETS

    model, cfg, d = _model()
    keys = set(model.state_dict())
    assert {"decoder.embed_tokens.weight", "decoder.norm.weight",
            "decoder.output_projection.weight"} <= keys  # llama-tiny is untied
    assert not any(k.endswith(".bias") for k in keys)  # no biases anywhere
    assert not any("embed_positions" in k for k in keys)  # rotary, not learned positions
    assert model.state_dict()["decoder.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads
    assert sum(p.numel() for p in model.parameters()) == PRESETS["llama-tiny"].approx_params(len(d))
    x = torch.randint(0, len(d), (3, 17))
    with torch.no_grad():
        logits, _ = model(x)
        features, _ = model(x, features_only=True)
    assert logits.shape == (3, 17, len(d)) and features.shape == (3, 17, 64)
    with pytest.raises(ValueError, match="longer than the model's 128 positions"):
        model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("tie", [True, False])
def test_no_future_leakage(tie):
    import torch

    model, _, d = _model(tie_embeddings=tie)
    x = torch.randint(4, len(d), (2, 24))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1 - 4) % (len(d) - 4) + 4
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert torch.equal(a[:, :12], b[:, :12]) and not torch.allclose(a[:, 12:], b[:, 12:])


def test_tied_and_untied_output_embedding():
    import torch

    tied, _, d = _model(tie_embeddings=True)
    untied, _, _ = _model(tie_embeddings=False)
    assert "decoder.output_projection.weight" not in tied.state_dict()
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + len(d) * 64
    x = torch.randint(0, len(d), (1, 9))
    with torch.no_grad():
        feats = tied(x, features_only=True)[0]
        assert torch.equal(tied(x)[0], feats @ tied.decoder.embed_tokens.weight.t())
        feats = untied(x, features_only=True)[0]
        assert torch.equal(untied(x)[0], feats @ untied.decoder.output_projection.weight.t())


def test_grouped_query_attention_shares_each_kv_head_with_consecutive_query_heads():
    """GQA with kv heads duplicated into a full multi-head model gives the same logits."""
    import torch

    gqa, _, d = _model(decoder_kv_heads=2)
    full, _, _ = _model(decoder_kv_heads=4)
    state = dict(gqa.state_dict())
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            key = f"decoder.layers.{i}.self_attn.{proj}.weight"
            heads = state[key].view(2, 16, 64)  # kv head j serves query heads 2j and 2j+1
            state[key] = heads.repeat_interleave(2, dim=0).reshape(64, 64)
    full.load_state_dict(state, strict=True)
    x = torch.randint(0, len(d), (2, 20))
    with torch.no_grad():
        assert torch.allclose(gqa(x)[0], full(x)[0], atol=1e-5)
    with pytest.raises(ValueError, match="do not divide"):
        _model(decoder_kv_heads=3)


def test_chunked_loss_matches_full_cross_entropy_untied():
    import torch
    import torch.nn.functional as F

    from fairseq_ext.streams import IGNORED_TARGET

    model, _, d = _model(loss_chunk_tokens=7)
    model.train()
    x = torch.randint(4, len(d), (3, 30))
    y = torch.randint(4, len(d), (3, 30))
    y[0, :3] = d.pad()  # a real target even if it is the pad id (GPT-2 pads with eos)
    y[1, -4:] = IGNORED_TARGET  # padding (never told by the pad id)
    loss = model.lm_loss(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x)[0]
    ref = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                          ignore_index=IGNORED_TARGET, reduction="sum")
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n


def test_preset_config_and_checkpoint_roundtrip(tmp_path):
    """The trainer's path: elm_config_for_preset + build_model_from_cfg by the preset's arch."""
    import torch
    from fairseq_ext import checkpoint as ck
    from fairseq_ext.models.preset_config import model_config_for_preset
    from fairseq_ext.models.llama import LlamaElmConfig, LlamaElmModel
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig

    _model()  # registers
    cfg = model_config_for_preset("llama-tiny")
    assert isinstance(cfg, LlamaElmConfig) and cfg.decoder_kv_heads == 2 and not cfg.tie_embeddings
    cfg._name = "llama_tiny"
    cfg.rope_theta = 500.0  # a non-preset value travels in the checkpoint cfg
    d = _dictionary()
    full = ck.make_cfg(cfg, MultidomainLMConfig(data=str(tmp_path)))
    model = ck.build_model_from_cfg(full["model"], d)
    assert isinstance(model, LlamaElmModel) and model.decoder.cfg.rope_theta == 500.0
    ck.save_checkpoint(ck.make_state(model.state_dict(), full, d), tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["cfg"]["model"]["_name"] == "llama_tiny"
    loaded = ck.load_model(tmp_path / "m.pt")
    assert loaded.model.decoder.cfg.rope_theta == 500.0
    x = torch.randint(0, len(d), (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.model(x)[0], model.eval()(x)[0])


def test_presets_layouts():
    from launcher.contract.errors import BtmError
    from launcher.contract.presets import PRESETS, Preset, layout_of_arch

    assert all(PRESETS[n].layout == "gpt2" for n in ("tiny", "125m", "350m", "750m", "1.3b"))
    assert PRESETS["llama-tiny"].layout == "llama"
    assert layout_of_arch("elm_tiny") == "gpt2" and layout_of_arch("llama_tiny") == "llama"
    assert PRESETS["smollm2-135m"].approx_params(49152) == 134_515_008  # the published counts
    assert round(PRESETS["llama-3.2-1b"].approx_params(128256) / 1e6) == 1236
    with pytest.raises(BtmError, match="'mamba'"):
        Preset("x", "x", layers=1, embed_dim=8, heads=2, ffn_dim=8, layout="mamba")
    with pytest.raises(BtmError, match="gpt2 layout has no kv_heads"):
        Preset("x", "x", layers=1, embed_dim=8, heads=2, ffn_dim=8, kv_heads=1)
    with pytest.raises(BtmError, match="not a btm ELM arch"):
        layout_of_arch("transformer_lm")


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data

    return build_data(small_corpus, tmp_path_factory.mktemp("data"), ["bible", "code_python"])


def test_trainer_lowers_the_loss_and_scorer_reads_it(data_dir, tmp_path):
    """Real updates with btm's trainer on the llama-tiny preset, then btm's scorer."""
    import numpy as np
    from fairseq_ext.scoring import ContextSettings, score_split
    from fairseq_ext.train import TrainSpec, read_train_log, train_lm

    spec = TrainSpec(data_dir=str(data_dir), domains=["bible"], save_dir=str(tmp_path / "run"),
                     preset="llama-tiny", max_updates=20, tokens_per_batch=512,
                     save_interval_updates=10, valid_max_tokens=4096, log_interval=5)
    result = train_lm(spec)
    assert result.num_updates == 20
    losses = [r["loss"] for r in read_train_log(tmp_path / "run") if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    valid = [r["valid_loss"] for r in read_train_log(tmp_path / "run") if "valid_loss" in r]
    assert valid[-1] < valid[0]
    scores = score_split(result.checkpoint_last, data_dir, "bible", "valid",
                         cache_dir=tmp_path / "cache", context=ContextSettings(max_docs=2))
    assert scores.tokens > 0 and np.all(scores.logprobs < 0)
    assert abs(scores.nll - result.valid_losses["bible"]) < 0.5  # same model, fewer documents
