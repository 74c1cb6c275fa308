"""``btm export hf``: btm checkpoints -> transformers GPT-2 directories (fairseq_ext/export_hf.py).

Real parts only: the real `btm data prepare` output of the small corpus (sentencepiece + fairseq
dict), real ELM checkpoints (random init with every parameter perturbed, so that a wrong
rename, a missing transpose or a dropped bias shows), the real btm scorer and real transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from eval_fixtures import DOMAINS, tiny_data  # noqa: F401
from launcher.contract.errors import BtmError

pytestmark = pytest.mark.fairseq


def _transformers():
    import importlib.util

    require(importlib.util.find_spec("transformers") is not None, "transformers is not installed")
    from fairseq_ext.hf_compat import import_transformers

    return import_transformers()


def make_perturbed_expert(data_dir: Path, out: Path, *, seed: int, layers: int = 2,
                          positions: int = 96) -> Path:
    """A 2-layer ELM checkpoint whose every parameter (biases, LayerNorms too) is random."""
    import torch
    from fairseq.data import Dictionary

    from fairseq_ext.checkpoint import build_model_from_cfg, make_cfg, make_state, save_checkpoint
    from fairseq_ext.models.elm import ElmConfig
    from fairseq_ext.tasks.multidomain_lm import MultidomainLMConfig

    if out.exists():
        return out
    torch.manual_seed(seed)
    dictionary = Dictionary.load(str(data_dir / "dict.txt"))
    model_cfg = ElmConfig(decoder_layers=layers, decoder_embed_dim=32, decoder_attention_heads=4,
                          decoder_ffn_embed_dim=48, max_target_positions=positions)
    model_cfg._name = "elm_tiny"
    cfg = make_cfg(model_cfg, MultidomainLMConfig(data=str(data_dir)))
    model = build_model_from_cfg(cfg["model"], dictionary)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(make_state(model.state_dict(), cfg, dictionary), out)
    return out


@pytest.fixture
def experts(tiny_data, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    out = tmp_path_factory.getbasetemp() / "hf_experts"
    out.mkdir(exist_ok=True)
    return {name: make_perturbed_expert(tiny_data, out / f"{name}.pt", seed=i)
            for i, name in enumerate(["alpha", "beta"])}


@pytest.fixture
def exported(experts, tmp_path_factory) -> Path:
    from fairseq_ext.export_hf import export_hf

    out = tmp_path_factory.getbasetemp() / "hf_export_alpha"
    export_hf(experts["alpha"], out)
    return out


def hf_block_logprobs(model, tokens: np.ndarray, doc_starts: np.ndarray, positions: int,
                      eos: int = 2) -> np.ndarray:
    """Per-token log-probs from a transformers model, each document fed with eos (``eos``) in
    front and cut into blocks of ``positions`` targets (the btm scorer's default context settings)."""
    import torch

    out = np.zeros(len(tokens), dtype=np.float32)
    ends = list(doc_starts[1:]) + [len(tokens)]
    for s0, s1 in zip(doc_starts, ends):
        for a in range(s0, s1, positions):
            b = min(a + positions, s1)
            inputs = np.concatenate([[eos], tokens[s0:s1 - 1]])[a - s0:b - s0]  # eos + shifted doc
            with torch.no_grad():
                logits = model(torch.from_numpy(inputs[None].astype(np.int64))).logits[0].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.from_numpy(tokens[a:b][:, None]))[:, 0]
            out[a:b] = lp.numpy()
    return out


# ----------------------------------------------------------------------------- the model


def test_export_loads_as_gpt2_without_remote_code(exported):
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=False)
    tok = transformers.AutoTokenizer.from_pretrained(exported, trust_remote_code=False)
    assert type(model).__name__ == "GPT2LMHeadModel"
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.n_positions) == (2, 32, 4, 48, 96)
    assert cfg.activation_function == "gelu_new" and cfg.layer_norm_epsilon == 1e-5
    assert cfg.vocab_size == len(tok) == 400  # the whole fairseq dictionary, specials included
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 2, 1, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    files = sorted(os.listdir(exported))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert name in files


@pytest.mark.parametrize("domain", ["bible", "code_python"])
def test_logprobs_equal_btm_scorer_on_real_text(tiny_data, experts, exported, domain, tmp_path):  # noqa: F811
    import torch

    from fairseq_ext.scoring import ContextSettings, read_split, score_split

    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ctx = ContextSettings(max_docs=3)  # blocks of the model's 96 positions, one stream per doc
    btm = score_split(experts["alpha"], tiny_data, domain, "valid", cache_dir=tmp_path, context=ctx)
    tokens, starts = read_split(tiny_data, domain, "valid", max_docs=3)
    assert len(tokens) > 3 * 96  # long enough that documents span several blocks
    hf = hf_block_logprobs(model, tokens, starts, 96)
    np.testing.assert_allclose(hf, btm.logprobs, atol=1e-4, rtol=0)
    assert np.all(btm.logprobs < 0) and btm.logprobs.std() > 0.1  # a real, non-trivial model


def test_full_distribution_equals_elm_forward(tiny_data, experts, exported):  # noqa: F811
    import torch

    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.data_prep import encode_text

    transformers = _transformers()
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    elm = load_model(experts["alpha"]).model
    ids = torch.tensor([[2] + encode_text(tiny_data, "def main():\n\treturn {'a': 1}  # done\n")[:95]])
    with torch.no_grad():
        a = torch.log_softmax(elm(ids)[0].float(), -1)
        b = torch.log_softmax(hf(ids).logits.float(), -1)
    assert a.shape == b.shape == (1, ids.shape[1], 400)
    assert float((a - b).abs().max()) < 1e-4


def test_export_is_byte_identical_and_resumes(experts, exported, tmp_path):
    from fairseq_ext.export_hf import export_hf

    again = tmp_path / "again"
    export_hf(experts["alpha"], again)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name
    before = (again / "model.safetensors").stat().st_mtime_ns
    record = export_hf(experts["alpha"], again)  # same checkpoint bytes: kept, not rewritten
    assert (again / "model.safetensors").stat().st_mtime_ns == before
    assert record["model_safetensors_sha256"] == json.loads((exported / "btm_export.json").read_text())[
        "model_safetensors_sha256"]
    other = tmp_path / "other"
    export_hf(experts["beta"], other)
    assert (other / "model.safetensors").read_bytes() != (exported / "model.safetensors").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


# ----------------------------------------------------------------------------- the tokenizer

HARD_TEXTS = [
    "Hello  world\tfoo\n\nbar   baz",
    "def f(x):\n\tif x:\n\t\treturn x ** 2  # ünïcödé\r\n",
    "中文字符 и кириллица, ελληνικά; emoji 😀👍🏽 and \u3000 ideographic space",
    "    leading spaces", "trailing spaces    ", " ", "", "\n", "\t\t\t", "\n\n\n\n",
    "a" * 50 + " " * 17 + "b",
    "literal specials </s> <s> <pad> <unk> and byte names <0x0A> <0xE2>",
    "numbers 1234567890 3.14159 -42 1e-5",
    "\x00\x01\x7f control chars and \ufeff BOM",
    "combining e\u0301 vs \u00e9, NFC/NFD must not be normalized",
]


def corpus_texts(n_per_domain: int = 5) -> list[str]:
    import gzip

    from conftest import CORPUS

    texts = []
    for domain in sorted(p.name for p in CORPUS.iterdir() if p.is_dir()):
        with gzip.open(CORPUS / domain / "valid.jsonl.gz", "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i == n_per_domain:
                    break
                texts.append(json.loads(line)["text"])
    return texts


def test_token_ids_identical_on_hard_and_real_text(tiny_data, exported):  # noqa: F811
    from fairseq_ext.data_prep import decode_ids, encode_text

    transformers = _transformers()
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    texts = HARD_TEXTS + corpus_texts()  # all 8 domains of the development corpus
    assert len(texts) > 40
    for text in texts:
        ours = encode_text(tiny_data, text)
        theirs = tok(text, add_special_tokens=False)["input_ids"]
        assert theirs == ours, repr(text[:60])
        assert tok.decode(theirs) == decode_ids(tiny_data, ours) == text


def test_token_ids_identical_on_random_strings(tiny_data, exported):  # noqa: F811
    """Fuzz: random mixes of the characters and pieces where tokenizers tend to disagree."""
    from fairseq_ext.data_prep import encode_text

    transformers = _transformers()
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    rng = random.Random(1234)
    alphabet = (list(" \t\n\r\x0b\x0c\u00a0\u3000abcdeXYZ0189éüß中文😀_-(){}[]<>/\\:;'\"#=")
                + ["    ", "  ", "the", " the", "\n\n", "\t\t", "def ", "self.", "</s>", "<0x0A>"])
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(1500)]
    batch = tok(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, ids in zip(texts, batch) if ids != encode_text(tiny_data, t)]
    assert not mismatches, [repr(t) for t in mismatches[:3]]


def test_literal_space_mark_is_the_documented_difference(tiny_data, exported):  # noqa: F811
    """btm writes a literal U+2581 as byte pieces; the exported tokenizer reads it as a space
    (docs/export.md explains why no serializable tokenizer can do otherwise)."""
    from fairseq_ext.data_prep import encode_text
    from fairseq_ext.hf_tokenizer import has_space_mark

    transformers = _transformers()
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    text = "a\u2581b"
    assert has_space_mark(text) and not has_space_mark("a b")
    assert tok(text, add_special_tokens=False)["input_ids"] == encode_text(tiny_data, "a b")
    assert encode_text(tiny_data, text) != encode_text(tiny_data, "a b")


# ----------------------------------------------------------------------------- forests, CLI, errors


def test_export_forest_dir_and_run_dir(tiny_data, experts, tmp_path):  # noqa: F811
    from fairseq_ext.export_hf import export_hf

    transformers = _transformers()
    from launcher.contract.forest import Forest

    run = tmp_path / "run"
    (run / "experts").mkdir(parents=True)
    (run / "priors").mkdir()
    manifest = Forest.load_or_new(run / "forest.json", "run")
    for name, ckpt in experts.items():
        dst = run / "experts" / f"{name}.pt"
        dst.write_bytes(ckpt.read_bytes())
        manifest.add(name, ["bible"], dst)
    manifest.save()
    (run / "priors" / "bible.abc.json").write_text(json.dumps({"prior": [0.25, 0.75]}))
    out = tmp_path / "hf"
    index = export_hf(run, out)
    assert sorted(index["experts"]) == ["alpha", "beta"] and index["priors"] == ["bible.abc.json"]
    assert (out / "forest.json").read_bytes() == (run / "forest.json").read_bytes()
    assert (out / "priors" / "bible.abc.json").is_file()
    for name in ("alpha", "beta"):
        model = transformers.AutoModelForCausalLM.from_pretrained(out / name)
        assert model.config.vocab_size == 400
    # a plain directory of <expert>.pt files is a forest too; experts match the run's exports
    out2 = tmp_path / "hf2"
    export_hf(run / "experts", out2)
    assert ((out2 / "beta" / "model.safetensors").read_bytes()
            == (out / "beta" / "model.safetensors").read_bytes())
    # a checkpoint that changed after the merge is refused
    (run / "experts" / "beta.pt").write_bytes((run / "experts" / "alpha.pt").read_bytes())
    with pytest.raises(BtmError, match="changed since"):
        export_hf(run, tmp_path / "hf3")


def _parser():
    from launcher.commands import export

    parser = argparse.ArgumentParser(prog="btm")
    export.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_exports_and_reports_errors(tiny_data, experts, tmp_path, capsys):  # noqa: F811
    args = _parser().parse_args(["export", "hf", str(experts["beta"]), str(tmp_path / "out"),
                                 "--data-dir", str(tiny_data)])
    assert args.func(args) == 0
    assert "exported" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()

    missing = _parser().parse_args(["export", "hf", str(tmp_path / "nope.pt"), str(tmp_path / "o2")])
    with pytest.raises(BtmError, match="nope.pt"):
        missing.func(missing)
    no_data = _parser().parse_args(["export", "hf", str(experts["beta"]), str(tmp_path / "o3"),
                                    "--data-dir", str(tmp_path)])
    with pytest.raises(BtmError, match="spm.model"):
        no_data.func(no_data)
    assert not (tmp_path / "o3").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    taken = _parser().parse_args(["export", "hf", str(experts["beta"]), str(tmp_path / "taken")])
    with pytest.raises(BtmError, match="not a btm export"):
        taken.func(taken)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_non_elm_checkpoint_is_refused(experts, tmp_path):
    import torch

    from fairseq_ext.checkpoint import load_checkpoint, save_checkpoint
    from fairseq_ext.export_hf import export_hf

    state = load_checkpoint(experts["alpha"])
    state["model"]["decoder.extra_head.weight"] = torch.zeros(2, 2)
    save_checkpoint(state, tmp_path / "odd.pt")
    with pytest.raises(BtmError, match="decoder.extra_head.weight"):
        export_hf(tmp_path / "odd.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
