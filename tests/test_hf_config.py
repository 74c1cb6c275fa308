"""model.init / corpus.tokenizer / model.arch (launcher/hf_config.py): checked from the model
directory's JSON at config load and --dry-run, before any job; the ~1B example plans.

The model directories here hold only the JSON files a config check reads (the shapes of real
models), so nothing is downloaded and no weights are needed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import CORPUS, REPO, require, run_btm
from launcher.config import load_config, parse_config
from launcher.contract.errors import BtmError

EXAMPLE = REPO / "examples" / "hf" / "tinyllama-1.1b.yaml"
LLAMA_TINY = dict(model_type="llama", vocab_size=400, hidden_size=64, intermediate_size=176,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False)
TINYLLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 max_position_embeddings=2048, tie_word_embeddings=False)


def model_json(out: Path, config: dict, tokenizer_ids: int) -> Path:
    """config.json and a tokenizer.json with ids 0..tokenizer_ids-1 (what the check reads)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "x": tokenizer_ids - 1}
    (out / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab},
                                                    "added_tokens": []}))
    return out


def _config(tmp_path: Path, model: dict, tokenizer: str | None = "hf:model") -> Path:
    data = {"name": "t", "domains": {"train": ["a"], "eval": ["a"]}, "model": model}
    if tokenizer:
        data["corpus"] = {"tokenizer": tokenizer}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_arch_must_be_the_presets_layout():
    text = yaml.safe_dump({"domains": {"train": ["a"], "eval": ["a"]},
                           "model": {"preset": "tiny", "arch": "llama"}})
    with pytest.raises(BtmError, match=r"model.arch: arch 'llama' does not match preset 'tiny', "
                                       r"which is the gpt2 layout; choose a llama preset \(llama-tiny"):
        parse_config(text, "cfg.yaml")
    with pytest.raises(BtmError, match=r"model.arch: unknown arch 'opt'; use gpt2 or llama"):
        parse_config(text.replace("llama", "opt"), "cfg.yaml")


def test_init_needs_the_hf_prefix_and_the_models_tokenizer():
    base = {"domains": {"train": ["a"], "eval": ["a"]}, "model": {"preset": "llama-tiny"}}
    with pytest.raises(BtmError, match=r"cfg.yaml:\d+: model.init: expected hf:PATH .* got '/models/x'"):
        parse_config(yaml.safe_dump(base | {"model": {"preset": "llama-tiny", "init": "/models/x"}}),
                     "cfg.yaml")
    with pytest.raises(BtmError, match=r"model.init: a pretrained seed needs its own token ids: "
                                       r"set corpus.tokenizer"):
        parse_config(yaml.safe_dump(base | {"model": {"preset": "llama-tiny", "init": "hf:m"}}), "cfg.yaml")


def test_relative_paths_resolve_against_the_config_and_the_shape_is_checked(tmp_path):
    model_json(tmp_path / "model", LLAMA_TINY, 384)
    cfg = load_config(_config(tmp_path, {"preset": "llama-tiny", "init": "hf:model"}))
    assert cfg.model.init == cfg.corpus.tokenizer == f"hf:{(tmp_path / 'model').resolve()}"

    model_json(tmp_path / "model", LLAMA_TINY | {"num_hidden_layers": 3}, 384)
    with pytest.raises(BtmError, match=r"run.yaml: model.init: .*/model/config.json: num_hidden_layers "
                                       r"is 3, but preset 'llama-tiny' has 2"):
        load_config(_config(tmp_path, {"preset": "llama-tiny", "init": "hf:model"}))
    with pytest.raises(BtmError, match=r"model_type 'llama' is the llama layout, but preset 'tiny' "
                                       r"is the gpt2 layout"):
        load_config(_config(tmp_path, {"preset": "tiny", "init": "hf:model"}))


def test_a_tokenizer_larger_than_the_embedding_names_both(tmp_path):
    model_json(tmp_path / "model", LLAMA_TINY, 512)
    with pytest.raises(BtmError, match=r"corpus.tokenizer: .*tokenizer.json has 512 ids but "
                                       r"model.init's embedding .* has 400 rows"):
        load_config(_config(tmp_path, {"preset": "llama-tiny", "init": "hf:model"}))


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(BtmError, match=r"corpus.tokenizer: directory not found: .*/nowhere"):
        load_config(_config(tmp_path, {"preset": "tiny"}, tokenizer="hf:nowhere"))


def test_the_1b_example_validates_and_plans(tmp_path):
    require(CORPUS.is_dir(), f"development corpus not found at {CORPUS}")
    model = model_json(tmp_path / "TinyLlama_v1.1", TINYLLAMA, 32000)
    sets = {"model.init": f"hf:{model}", "corpus.tokenizer": f"hf:{model}"}
    cfg = load_config(EXAMPLE, overrides=sets, corpus=CORPUS)
    assert cfg.model.preset == "tinyllama-1.1b" and cfg.executor == "slurm"
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = run_btm("run", EXAMPLE, "--corpus", CORPUS, "--run-dir", tmp_path / "run", "--dry-run", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "seed 0 updates" in r.stdout and "4 experts x 2000 updates on 8/4 GPUs each" in r.stdout
    assert f"seed: imported from hf:{model}, used as is" in r.stdout
    assert not (tmp_path / "run" / "records").exists()


def test_a_directory_without_tokenizer_json_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(BtmError, match=r"run.yaml: corpus.tokenizer: .*/model has no tokenizer.json"):
        load_config(_config(tmp_path, {"preset": "tiny"}))
