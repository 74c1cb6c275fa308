"""A GPT-2-family tokenizer (only ``<|endoftext|>``, no pad token) through the real pipeline parts.

A byte-level BPE tokenizer trained here with ``tokenizers`` and a tiny ``GPT2LMHeadModel``
saved beside it with ``save_pretrained`` (nothing is downloaded): data prep pads with eos
(docs/data.md), the model imports exactly, trains on, scores and exports; eos stays a real
target everywhere because padding is told by position, never by id.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import require_fairseq
from hf_fixtures import ENDOFTEXT, save_gpt2_model_dir
from test_export_hf import _transformers, hf_block_logprobs

pytestmark = pytest.mark.fairseq


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, small_corpus) -> dict:
    from tokenizers import Tokenizer

    from fairseq_ext.data_prep import prepare_data

    require_fairseq()
    _transformers()
    base = tmp_path_factory.mktemp("gpt2")
    model = save_gpt2_model_dir(base / "model", small_corpus)
    prepare_data(small_corpus, base / "data", tokenizer=f"hf:{model}", workers=1, progress=False)
    eot = Tokenizer.from_file(str(model / "tokenizer.json")).token_to_id(ENDOFTEXT)
    return {"model": model, "data": base / "data", "eot": eot, "base": base}


def _first_doc(corpus: Path, domain: str, split: str) -> str:
    return json.loads((corpus / domain / f"{split}.jsonl").read_text().splitlines()[0])["text"]


def test_pads_with_eos_and_a_document_is_its_text_then_eos(gpt2, small_corpus):
    from tokenizers import Tokenizer

    from fairseq_ext.scoring import read_split

    eot = gpt2["eot"]
    manifest = json.loads((gpt2["data"] / "manifest.json").read_text())
    assert manifest["settings"]["special_ids"] == {"bos": eot, "pad": eot, "eos": eot, "unk": eot,
                                                   "bos_per_document": None}
    assert eot == manifest["vocab_size"] - 1  # after the vocabulary, as in GPT-2
    tok = Tokenizer.from_file(str(gpt2["model"] / "tokenizer.json"))
    tokens, starts = read_split(gpt2["data"], "legal", "test", max_docs=2)
    assert tokens[:starts[1]].tolist() == tok.encode(_first_doc(small_corpus, "legal", "test")).ids + [eot]


def test_eos_targets_count_in_validation(gpt2, tmp_path):
    """The last validation block is padded (inputs with eos): its padded targets are
    IGNORED_TARGET, and every real target -- each document's eos included -- is counted."""
    import torch
    import torch.nn.functional as F

    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.hf_import import import_hf
    from fairseq_ext.streams import IGNORED_TARGET, eval_blocks, read_tokens
    from fairseq_ext.training.validation import evaluate

    eot = gpt2["eot"]
    tokens = read_tokens(gpt2["data"] / "legal" / "valid")
    inputs, targets = eval_blocks(tokens, 128, eot)
    real = targets != IGNORED_TARGET
    assert int(real.sum()) == len(tokens) - 1 and not bool(real.all())  # the last block is padded
    assert targets[real].tolist() == tokens[1:].tolist() and int((targets == eot).sum()) == 8

    import_hf(gpt2["model"], tmp_path / "seed.pt", preset="tiny", data_dir=gpt2["data"])
    model = load_model(tmp_path / "seed.pt").model.eval()
    loss = evaluate(model, str(gpt2["data"]), ["legal"], 128, eot, torch.device("cpu"))["legal"]
    with torch.no_grad():
        logits = model(inputs)[0].float()
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORED_TARGET, reduction="sum")
    assert loss == pytest.approx(float(summed) / (len(tokens) - 1), rel=1e-5)


def test_import_train_score_and_export_match_transformers(gpt2, small_corpus, tmp_path):
    import torch

    from fairseq_ext.export_hf import export_hf
    from fairseq_ext.hf_import import import_hf
    from fairseq_ext.scoring import ContextSettings, read_split, score_split
    from fairseq_ext.train import TrainSpec, train_lm

    transformers = _transformers()
    data, eot = gpt2["data"], gpt2["eot"]
    tokens, starts = read_split(data, "bible", "test", max_docs=3)
    context = ContextSettings(max_docs=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2["model"], dtype=torch.float32).eval()

    imported = tmp_path / "seed.pt"
    import_hf(gpt2["model"], imported, preset="tiny", data_dir=data)
    btm = score_split(imported, data, "bible", "test", cache_dir=tmp_path / "s0", context=context)
    np.testing.assert_allclose(hf_block_logprobs(hf, tokens, starts, 128, eos=eot), btm.logprobs,
                               atol=1e-4, rtol=0)

    spec = TrainSpec(data_dir=str(data), domains=["bible", "legal"], save_dir=str(tmp_path / "expert"),
                     preset="tiny", init=str(imported), max_updates=3, tokens_per_batch=256,
                     save_interval_updates=3, valid_max_tokens=512)
    result = train_lm(spec)
    assert result.num_updates == 3 and all(np.isfinite(v) for v in result.valid_losses.values())
    trained = tmp_path / "expert" / "checkpoint_last.pt"
    btm = score_split(trained, data, "bible", "test", cache_dir=tmp_path / "s1", context=context)

    export_hf(trained, tmp_path / "export")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert type(exported).__name__ == "GPT2LMHeadModel"
    assert (tok.eos_token_id, tok.pad_token_id, exported.config.pad_token_id) == (eot, eot, eot)
    doc = _first_doc(small_corpus, "bible", "test")
    assert tok(doc)["input_ids"] + [eot] == tokens[:starts[1]].tolist()
    with torch.no_grad():
        after = hf_block_logprobs(exported.float(), tokens, starts, 128, eos=eot)
    np.testing.assert_allclose(after, btm.logprobs, atol=1e-4, rtol=0)
    assert float(np.abs(after - hf_block_logprobs(hf, tokens, starts, 128, eos=eot)).max()) > 1e-3
