"""Parameter averaging: exact fp32 arithmetic, validation of inputs, fairseq-format output."""
import pytest

from conftest import require_fairseq

pytestmark = pytest.mark.fairseq


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"),
                           ["bible", "code_python", "legal"])


def _expert(data_dir, path, seed, **overrides):
    """A randomly initialized tiny ELM saved as a btm checkpoint (distinct per seed)."""
    import torch
    from fairseq.data import Dictionary
    from fairseq_ext import checkpoint as ck
    from fairseq_ext.registry import register_all
    register_all()
    from fairseq_ext.models.elm import ElmDecoder, ElmModel, elm_config_for_preset
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig
    torch.manual_seed(seed)
    d = overrides.pop("dictionary", None) or Dictionary.load(str(data_dir / "dict.txt"))
    cfg = elm_config_for_preset("tiny", **overrides)
    cfg._name = "elm_tiny"
    model = ElmModel(ElmDecoder(cfg, d))
    state = ck.make_state(model.state_dict(), ck.make_cfg(cfg, MultidomainLMConfig(data=str(data_dir))), d)
    ck.save_checkpoint(state, path)
    return model.state_dict()


def test_average_equals_hand_computed_fp32(data_dir, tmp_path):
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from fairseq_ext.averaging import average_checkpoints
    from fairseq_ext.checkpoint import load_checkpoint, load_model
    raw = [0.2, 0.5, 0.3 * 3]
    sds = [_expert(data_dir, tmp_path / f"e{i}.pt", seed=i) for i in range(3)]
    out = tmp_path / "avg" / "checkpoint.pt"
    res = average_checkpoints([tmp_path / f"e{i}.pt" for i in range(3)], raw, out,
                              safetensors_path=tmp_path / "avg" / "model.safetensors")
    w = np.array(raw, dtype=np.float64) / np.sum(raw)
    assert res["weights"] == pytest.approx(list(w), abs=0)
    avg = load_checkpoint(out)
    assert avg["extra_state"]["num_updates"] == 0 and avg["last_optimizer_state"] is None
    st = load_file(str(tmp_path / "avg" / "model.safetensors"))
    for k in sds[0]:
        hand = np.zeros(tuple(sds[0][k].shape), dtype=np.float32)
        for wi, sd in zip(w, sds):  # acc = acc + float32(w_i) * x_i, in order
            hand = hand + np.float32(wi) * sd[k].numpy().astype(np.float32)
        assert np.array_equal(avg["model"][k].numpy(), hand), k
        assert torch.equal(st[k], avg["model"][k])
    loaded = load_model(out)  # a real fairseq model again
    assert loaded.model.decoder.embed_tokens.weight.shape[0] == len(loaded.dictionary)


def test_single_parent_is_an_exact_copy(data_dir, tmp_path):
    import torch
    from fairseq_ext.averaging import average_checkpoints
    from fairseq_ext.checkpoint import load_checkpoint
    sd = _expert(data_dir, tmp_path / "seed.pt", seed=5)
    average_checkpoints([tmp_path / "seed.pt"], [1.0], tmp_path / "copy.pt")
    out = load_checkpoint(tmp_path / "copy.pt")["model"]
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_refuses_bad_inputs(data_dir, tmp_path):
    from fairseq.data import Dictionary
    from launcher.contract.errors import BtmError
    from fairseq_ext.averaging import average_checkpoints
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    _expert(data_dir, a, 0)
    _expert(data_dir, b, 1)
    out = tmp_path / "o.pt"
    for bad, msg in (([-1, 2], "negative"), ([0, 0], "zero"), ([float("nan"), 1], "finite"),
                     ([1], "2 checkpoints")):
        with pytest.raises(BtmError, match=msg):
            average_checkpoints([a, b], bad, out)
    with pytest.raises(BtmError, match="not found"):
        average_checkpoints([a, tmp_path / "missing.pt"], [1, 1], out)
    wide = tmp_path / "wide.pt"
    _expert(data_dir, wide, 2, decoder_ffn_embed_dim=128)
    with pytest.raises(BtmError, match=r"a\.pt and .*wide\.pt.*decoder_ffn_embed_dim"):
        average_checkpoints([a, wide], [1, 1], out)
    other = Dictionary()
    for s in "abcdefghijklmnopqrstuvwxyz0123456789":
        other.add_symbol(s)
    other.finalize(padding_factor=8)
    odd = tmp_path / "odd.pt"
    _expert(data_dir, odd, 3, dictionary=other)
    with pytest.raises(BtmError, match=r"a\.pt and .*odd\.pt.*different dictionaries"):
        average_checkpoints([a, odd], [1, 1], out)
    assert not out.exists()
