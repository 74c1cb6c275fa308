"""Import of local transformers directories (fairseq_ext/hf_import.py): exact, and bad inputs.

Tiny GPT2LMHeadModel and LlamaForCausalLM are built here with random, perturbed weights and
written with ``save_pretrained`` (nothing is downloaded). Their vocabulary is the real prepared
data's 400 ids, so btm's scorer and transformers read the same token ids from the same text.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from eval_fixtures import tiny_data  # noqa: F401
from launcher.contract.errors import BtmError
from test_export_hf import _transformers, hf_block_logprobs

pytestmark = pytest.mark.fairseq
VOCAB = 400


def _perturbed(model, seed: int):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def save_gpt2(out: Path, **overrides) -> Path:
    transformers = _transformers()
    shape = dict(vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=2, n_head=2, n_inner=256,
                 bos_token_id=2, eos_token_id=2) | overrides
    _perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)), 1).save_pretrained(out)
    return out


def save_llama(out: Path, *, max_shard_size=None, **overrides) -> Path:
    transformers = _transformers()
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=3000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 bos_token_id=2, eos_token_id=2) | overrides
    model = _perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)), 2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf_models")
    # Llama 3's rope scaling, sized so that the 8 frequencies of a 16-dim head fall in all three
    # of its bands (kept, interpolated, divided by factor) within 128 positions
    llama3 = {"rope_type": "llama3", "rope_theta": 3000.0, "factor": 4.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return {"gpt2": save_gpt2(base / "gpt2"), "llama": save_llama(base / "llama"),
            "llama_sharded": save_llama(base / "llama_sharded", max_shard_size="100KB"),
            "llama_llama3": save_llama(base / "llama_llama3", rope_scaling=llama3)}


@pytest.mark.parametrize("name, preset", [("gpt2", "tiny"), ("llama", "llama-tiny"),
                                          ("llama_sharded", "llama-tiny"),
                                          ("llama_llama3", "llama-tiny")])
def test_import_scores_like_transformers(tiny_data, hf_dirs, name, preset, tmp_path):  # noqa: F811
    import torch

    from fairseq_ext.hf_import import import_hf
    from fairseq_ext.scoring import ContextSettings, read_split, score_split

    transformers = _transformers()
    if name == "llama_sharded":
        assert (hf_dirs[name] / "model.safetensors.index.json").is_file()
        assert len(list(hf_dirs[name].glob("model-*.safetensors"))) > 1
    out = tmp_path / "seed.pt"
    record = import_hf(hf_dirs[name], out, preset=preset, data_dir=tiny_data)
    assert record["preset"] == preset and record["model_type"] == name.split("_")[0]
    raw = torch.load(out, weights_only=True)  # no pickle needed
    assert raw["extra_state"]["btm"]["hf_import"] == record
    assert raw["cfg"]["model"]["_name"] == {"tiny": "elm_tiny", "llama-tiny": "llama_tiny"}[preset]

    ctx = ContextSettings(max_docs=3)  # blocks of the preset's 128 positions
    btm = score_split(out, tiny_data, "bible", "valid", cache_dir=tmp_path, context=ctx)
    tokens, starts = read_split(tiny_data, "bible", "valid", max_docs=3)
    assert len(tokens) > 3 * 128
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name], dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_block_logprobs(hf, tokens, starts, 128), btm.logprobs,
                               atol=1e-4, rtol=0)
    assert btm.logprobs.std() > 0.1


def test_llama3_rope_scaling_survives_import_and_export(tiny_data, hf_dirs, tmp_path):  # noqa: F811
    import torch

    from fairseq_ext.export_hf import export_hf
    from fairseq_ext.hf_import import import_hf

    transformers = _transformers()
    import_hf(hf_dirs["llama_llama3"], tmp_path / "seed.pt", preset="llama-tiny", data_dir=tiny_data)
    export_hf(tmp_path / "seed.pt", tmp_path / "back")
    scaling = json.loads((tmp_path / "back" / "config.json").read_text())["rope_scaling"]
    assert scaling == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    unscaled = _copy(tmp_path / "back", tmp_path / "unscaled")  # same weights, plain rotary
    config = json.loads((unscaled / "config.json").read_text())
    (unscaled / "config.json").write_text(json.dumps(config | {"rope_scaling": None}))
    ids = torch.tensor([[2] + list(range(10, 137))])
    with torch.no_grad():
        a, b, plain = (transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
                       .eval()(ids).logits for d in (hf_dirs["llama_llama3"], tmp_path / "back",
                                                     unscaled))
    assert float((a - b).abs().max()) < 1e-4
    assert float((a - plain).abs().max()) > 1e-2  # the scaling is applied, not ignored


def test_import_is_a_seed_the_trainer_continues(tiny_data, hf_dirs, tmp_path):  # noqa: F811
    from fairseq_ext.checkpoint import load_checkpoint
    from fairseq_ext.hf_import import import_hf
    from fairseq_ext.train import TrainSpec, train_lm

    import_hf(hf_dirs["llama"], tmp_path / "seed.pt", preset="llama-tiny", data_dir=tiny_data)
    spec = TrainSpec(data_dir=str(tiny_data), domains=["bible"], save_dir=str(tmp_path / "expert"),
                     preset="llama-tiny", init=str(tmp_path / "seed.pt"), max_updates=3,
                     tokens_per_batch=256, save_interval_updates=3, valid_max_tokens=512)
    assert train_lm(spec).num_updates == 3
    trained = load_checkpoint(tmp_path / "expert" / "checkpoint_last.pt")
    assert trained["cfg"]["model"]["rope_theta"] == 3000.0  # the imported model's, not the preset's


def test_reimport_resumes_and_never_overwrites(tiny_data, hf_dirs, tmp_path):  # noqa: F811
    from fairseq_ext.hf_import import import_hf

    out = tmp_path / "seed.pt"
    first = import_hf(hf_dirs["llama"], out, preset="llama-tiny", data_dir=tiny_data)
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    assert import_hf(hf_dirs["llama"], out, preset="llama-tiny", data_dir=tiny_data) == first
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    with pytest.raises(BtmError, match="not an import of these model files"):
        import_hf(hf_dirs["llama_sharded"], out, preset="llama-tiny", data_dir=tiny_data)
    assert out.read_bytes() == before[0]


# ----------------------------------------------------------------------------- bad inputs

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_no_weights(tiny_data, hf_dirs, tmp_path):  # noqa: F811
    from fairseq_ext.hf_import import import_hf

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(hf_dirs["llama"] / "config.json", bare / "config.json")
    with pytest.raises(BtmError, match=r"bare has no model.safetensors nor model.safetensors.index.json"):
        import_hf(bare, tmp_path / "o.pt", preset="llama-tiny", data_dir=tiny_data)
    assert not (tmp_path / "o.pt").exists()


def test_index_naming_a_missing_shard(tiny_data, hf_dirs, tmp_path):  # noqa: F811
    from fairseq_ext.hf_import import import_hf

    broken = _copy(hf_dirs["llama_sharded"], tmp_path / "broken")
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(BtmError, match=f"model.safetensors.index.json names shard {shard.name}, "
                                       "which is missing"):
        import_hf(broken, tmp_path / "o.pt", preset="llama-tiny", data_dir=tiny_data)


def test_unsupported_model_type_lists_the_supported(tiny_data, hf_dirs, tmp_path):  # noqa: F811
    from fairseq_ext.hf_import import import_hf

    odd = _copy(hf_dirs["llama"], tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(config | {"model_type": "mamba"}))
    with pytest.raises(BtmError, match=r"model_type 'mamba' is not supported; supported: gpt2, llama"):
        import_hf(odd, tmp_path / "o.pt", preset="llama-tiny", data_dir=tiny_data)
    with pytest.raises(BtmError, match=r"'gpt2' is the gpt2 layout, but preset 'llama-tiny' is the llama"):
        import_hf(hf_dirs["gpt2"], tmp_path / "o.pt", preset="llama-tiny", data_dir=tiny_data)


def test_pickle_weights_need_trust(tiny_data, hf_dirs, tmp_path):  # noqa: F811
    import torch
    from safetensors.torch import load_file

    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.hf_import import import_hf

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_dirs["gpt2"] / "config.json", pickled / "config.json")
    torch.save(load_file(str(hf_dirs["gpt2"] / "model.safetensors")), pickled / "pytorch_model.bin")
    with pytest.raises(BtmError, match=r"only pickle weights \(pytorch_model.bin\).*pickled/pytorch_model.bin.*model.trust_checkpoint: true"):
        import_hf(pickled, tmp_path / "o.pt", preset="tiny", data_dir=tiny_data)
    assert not (tmp_path / "o.pt").exists()
    import_hf(pickled, tmp_path / "o.pt", preset="tiny", data_dir=tiny_data, trust_pickle=True)
    import_hf(hf_dirs["gpt2"], tmp_path / "safe.pt", preset="tiny", data_dir=tiny_data)
    a, b = load_model(tmp_path / "o.pt").model, load_model(tmp_path / "safe.pt").model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_shape_or_vocab_not_matching_the_preset_names_both(tiny_data, tmp_path):  # noqa: F811
    from fairseq_ext.hf_import import import_hf

    deep = save_llama(tmp_path / "deep", num_hidden_layers=3)
    with pytest.raises(BtmError, match=r"num_hidden_layers is 3, but preset 'llama-tiny' has 2"):
        import_hf(deep, tmp_path / "o.pt", preset="llama-tiny", data_dir=tiny_data)
    tied = save_llama(tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(BtmError, match=r"tie_word_embeddings is True, but preset 'llama-tiny' has False"):
        import_hf(tied, tmp_path / "o.pt", preset="llama-tiny", data_dir=tiny_data)
    wide = save_gpt2(tmp_path / "wide", n_embd=128)
    with pytest.raises(BtmError, match=r"n_embd is 128, but preset 'tiny' has 64"):
        import_hf(wide, tmp_path / "o.pt", preset="tiny", data_dir=tiny_data)
    short = save_gpt2(tmp_path / "short", n_positions=64)
    with pytest.raises(BtmError, match=r"n_positions is 64, fewer than preset 'tiny'.s tokens_per_sample 128"):
        import_hf(short, tmp_path / "o.pt", preset="tiny", data_dir=tiny_data)
    big = save_llama(tmp_path / "big", vocab_size=512)
    with pytest.raises(BtmError, match=r"dict.txt has 400 symbols but the model's embedding .* has 512 rows"):
        import_hf(big, tmp_path / "o.pt", preset="llama-tiny", data_dir=tiny_data)
    scaled = save_llama(tmp_path / "scaled", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(BtmError, match=r"rope_type is 'linear'"):
        import_hf(scaled, tmp_path / "o.pt", preset="llama-tiny", data_dir=tiny_data)
    assert not (tmp_path / "o.pt").exists()


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers(tiny_data, hf_dirs, tmp_path):  # noqa: F811
    """The original GPT-2 checkpoints name tensors without ``transformer.`` and carry the causal
    mask buffers (``h.i.attn.bias``); they import to the same model."""
    import torch
    from safetensors.torch import load_file, save_file

    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.hf_import import import_hf

    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copy(hf_dirs["gpt2"] / "config.json", hub / "config.json")
    tensors = {k.removeprefix("transformer."): v
               for k, v in load_file(str(hf_dirs["gpt2"] / "model.safetensors")).items()}
    tensors |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 256, 256)) for i in range(2)}
    save_file(tensors, str(hub / "model.safetensors"))
    import_hf(hub, tmp_path / "hub.pt", preset="tiny", data_dir=tiny_data)
    import_hf(hf_dirs["gpt2"], tmp_path / "saved.pt", preset="tiny", data_dir=tiny_data)
    a, b = load_model(tmp_path / "hub.pt").model, load_model(tmp_path / "saved.pt").model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
