"""ELM model, multidomain task and checkpoint format (real fairseq, tiny preset)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, require_fairseq

pytestmark = pytest.mark.fairseq


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"),
                           ["bible", "code_python", "legal"])


def _tiny_model(data_dir, **overrides):
    from fairseq.data import Dictionary
    from fairseq_ext.registry import register_all
    register_all()
    from fairseq_ext.models.elm import ElmDecoder, ElmModel, elm_config_for_preset
    d = Dictionary.load(str(data_dir / "dict.txt"))
    cfg = elm_config_for_preset("tiny", **overrides)
    cfg._name = "elm_tiny"
    return ElmModel(ElmDecoder(cfg, d)), cfg, d


def test_gpt2_layout_and_tied_embeddings(data_dir):
    import torch
    model, cfg, d = _tiny_model(data_dir)
    keys = set(model.state_dict())
    assert "decoder.embed_tokens.weight" in keys and "decoder.embed_positions.weight" in keys
    assert "decoder.ln_f.weight" in keys and "decoder.ln_f.bias" in keys
    for i in range(cfg.decoder_layers):
        for k in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            assert f"decoder.layers.{i}.{k}.weight" in keys and f"decoder.layers.{i}.{k}.bias" in keys
    assert not any("output_projection" in k for k in keys)  # tied: no separate output matrix
    n = sum(p.numel() for p in model.parameters())
    from launcher.contract.presets import PRESETS
    assert n == PRESETS["tiny"].approx_params(len(d))
    # Causality: changing a later token never changes earlier logits.
    x = torch.randint(4, len(d), (2, 20))
    y = x.clone(); y[:, 10] = 5
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert torch.allclose(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_chunked_loss_matches_full_cross_entropy(data_dir):
    import torch
    import torch.nn.functional as F
    from fairseq_ext.streams import IGNORED_TARGET
    model, _, d = _tiny_model(data_dir, loss_chunk_tokens=7)
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
    with torch.no_grad():  # no-grad path (evaluation) gives the same number
        assert torch.allclose(model.lm_loss(x, y), ref, rtol=1e-5)


def _save_tiny(data_dir, path):
    from fairseq_ext import checkpoint as ck
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig
    model, cfg, d = _tiny_model(data_dir)
    tcfg = MultidomainLMConfig(data=str(data_dir), domains="bible", tokens_per_sample=128)
    state = ck.make_state(model.state_dict(), ck.make_cfg(cfg, tcfg), d, num_updates=7)
    ck.save_checkpoint(state, path)
    return model


def test_checkpoint_loads_weights_only_and_roundtrips(data_dir, tmp_path):
    import torch
    from fairseq_ext import checkpoint as ck
    path = tmp_path / "c.pt"
    model = _save_tiny(data_dir, path)
    raw = torch.load(path, weights_only=True)
    assert raw["args"] is None and raw["extra_state"]["num_updates"] == 7
    assert raw["cfg"]["model"]["_name"] == "elm_tiny" and raw["cfg"]["task"]["_name"] == "multidomain_lm"
    assert Path(str(path) + ".sha256").read_text().split()[0] == ck.verify_checkpoint(path)
    loaded = ck.load_model(path)
    x = torch.randint(4, len(loaded.dictionary), (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.model(x)[0], model.eval()(x)[0])
    assert loaded.dictionary.symbols == model.decoder.dictionary.symbols


def test_checkpoint_bad_inputs(data_dir, tmp_path):
    import argparse
    import torch
    from launcher.contract.errors import BtmError
    from fairseq_ext import checkpoint as ck
    with pytest.raises(BtmError, match="not found"):
        ck.load_checkpoint(tmp_path / "missing.pt")
    path = tmp_path / "c.pt"
    _save_tiny(data_dir, path)
    with open(path, "ab") as f:  # corrupt: sidecar no longer matches
        f.write(b"x")
    with pytest.raises(BtmError, match="sidecar"):
        ck.load_checkpoint(path)
    pickled = tmp_path / "old.pt"
    torch.save({"args": argparse.Namespace(arch="x"), "model": {}}, pickled)
    with pytest.raises(BtmError, match="--trust-checkpoint"):
        ck.load_checkpoint(pickled)
    assert ck.load_checkpoint(pickled, trust_pickle=True)["args"].arch == "x"


def test_fairseq_eval_lm_reads_elm_checkpoint(data_dir, tmp_path):
    path = tmp_path / "c.pt"
    _save_tiny(data_dir, path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.eval_lm", str(data_dir), "--path", str(path),
         "--user-dir", str(REPO / "fairseq_ext"), "--task", "multidomain_lm",
         "--domains", "legal", "--gen-subset", "valid", "--tokens-per-sample", "128",
         "--max-tokens", "2048", "--cpu", "--num-workers", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Perplexity" in proc.stderr + proc.stdout


def test_task_mixture_probs_and_splits(data_dir):
    import numpy as np
    from launcher.contract.errors import BtmError
    from fairseq_ext.tasks.multidomain_lm import mixture_probs, parse_domains
    assert np.allclose(mixture_probs([100, 300], temperature=1.0), [0.25, 0.75])
    assert np.allclose(mixture_probs([100, 300], temperature=1e9), [0.5, 0.5], atol=1e-6)
    assert np.allclose(mixture_probs([1, 1], weights=[1, 3]), [0.25, 0.75])
    for bad in ([-1, 2], [0, 0], [float("nan"), 1]):
        with pytest.raises(BtmError):
            mixture_probs([1, 1], weights=bad)
    assert parse_domains(str(data_dir), "") == ["bible", "code_python", "legal"]
    with pytest.raises(BtmError, match="nope"):
        parse_domains(str(data_dir), "bible,nope")


def test_small_preset_is_about_ten_times_tiny(data_dir):
    from fairseq.data import Dictionary
    from fairseq_ext.registry import register_all
    from launcher.contract.presets import PRESETS
    register_all()
    from fairseq_ext.models.elm import ElmDecoder, ElmModel, elm_config_for_preset
    d = Dictionary.load(str(data_dir / "dict.txt"))
    cfg = elm_config_for_preset("small")
    cfg._name = "elm_small"
    model = ElmModel(ElmDecoder(cfg, d))
    assert (cfg.decoder_layers, cfg.decoder_embed_dim) == (4, 256)
    assert sum(p.numel() for p in model.parameters()) == PRESETS["small"].approx_params(len(d))
    # With the reproduction's 4096-token vocabulary: 4.24M against tiny's 0.37M parameters.
    assert 9 < PRESETS["small"].approx_params(4096) / PRESETS["tiny"].approx_params(4096) < 12
