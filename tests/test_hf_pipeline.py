"""A forest branched from a Hugging Face model end to end on the local executor, nothing downloaded.

A tiny ``LlamaForCausalLM`` (random, perturbed weights) and a byte-level BPE tokenizer trained
here with ``tokenizers`` are saved in one directory; ``btm run`` with ``model.init: hf:`` and
``corpus.tokenizer: hf:`` prepares the data with the model's own ids, imports the model as the
seed, trains it on, branches three experts and averages them; the exported experts and the
average load in ``transformers`` and score every token as btm does (within 1e-4).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import require_fairseq, run_btm
from hf_fixtures import save_model_dir
from launcher.contract.atomic import sha256_file
from launcher.contract.hf_model import hf_files
from test_export_hf import _transformers, hf_block_logprobs

pytestmark = pytest.mark.fairseq

CONFIG = """\
name: hf-seed
corpus:
  path: {corpus}
  tokenizer: hf:model
domains:
  train: [bible, code_python, legal]
  eval: [bible, code_python, legal]
model:
  preset: llama-tiny
  arch: llama
  init: hf:model
budget:
  total_updates: 16
  gpus: 1
  seed_fraction: 0.25
  save_interval_updates: 4
branching:
  sample_docs: 8
evaluation:
  methods: [experts, ensemble_uniform, average_uniform]
executor: local
max_parallel: 2
"""


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, small_corpus) -> Path:
    require_fairseq()
    _transformers()
    base = tmp_path_factory.mktemp("hf_run")
    save_model_dir(base / "model", small_corpus)
    (base / "run.yaml").write_text(CONFIG.format(corpus=small_corpus))
    r = run_btm("run", base / "run.yaml", "--run-dir", base / "run", "--no-progress", timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    return base


def _first_doc(corpus: Path, domain: str, split: str) -> str:
    return json.loads((corpus / domain / f"{split}.jsonl").read_text().splitlines()[0])["text"]


def test_seed_imports_the_model_and_its_record_lists_the_model_files(hf_run):
    record = json.loads((hf_run / "run" / "records" / "seed.json").read_text())
    model = (hf_run / "model").resolve()
    files = hf_files(model)
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    for path in files:
        assert record["inputs"][str(path)] == sha256_file(path)
    assert record["hf_import"]["source"] == str(model)
    assert record["params"]["init"] == f"hf:{model}" and record["train"]["num_updates"] == 4
    forest = json.loads((hf_run / "run" / "forest.json").read_text())
    assert all(e["parents"] == {"seed": 1.0} for e in forest["experts"])


def test_data_holds_the_models_own_token_ids(hf_run, small_corpus):
    from tokenizers import Tokenizer

    from fairseq_ext.scoring import read_split

    tok = Tokenizer.from_file(str(hf_run / "model" / "tokenizer.json"))
    tokens, starts = read_split(hf_run / "run" / "data", "legal", "test", max_docs=2)
    doc = _first_doc(small_corpus, "legal", "test")
    # Llama's convention, from the tokenizer itself: <s> (1) in front, </s> (2) after
    assert tokens[:starts[1]].tolist() == tok.encode(doc).ids + [2] and tokens[0] == 1
    manifest = json.loads((hf_run / "run" / "data" / "manifest.json").read_text())
    assert manifest["settings"]["special_ids"] == {"bos": 1, "pad": 0, "eos": 2, "unk": 0,
                                                   "bos_per_document": 1}
    assert manifest["vocab_size"] == 400  # the embedding's rows, beyond the tokenizer's 384 ids


def test_import_scores_like_transformers(hf_run, tmp_path):
    import torch

    from fairseq_ext.scoring import ContextSettings, read_split, score_split

    transformers = _transformers()
    data, imported = hf_run / "run" / "data", hf_run / "run" / "seed" / "hf_import.pt"
    btm = score_split(imported, data, "legal", "test", cache_dir=tmp_path,
                      context=ContextSettings(max_docs=2))
    tokens, starts = read_split(data, "legal", "test", max_docs=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_run / "model", dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_block_logprobs(hf, tokens, starts, 128), btm.logprobs, atol=1e-4, rtol=0)


def test_exported_experts_and_average_load_in_transformers_and_score_like_btm(hf_run, tmp_path):
    import torch

    from fairseq_ext.data_prep import encode_text
    from fairseq_ext.export_hf import export_hf
    from fairseq_ext.scoring import ContextSettings, read_split, score_split

    transformers = _transformers()
    run, out = hf_run / "run", tmp_path / "export"
    export_hf(run, out)
    average = run / "averages" / "uniform" / "checkpoint.pt"
    export_hf(average, tmp_path / "average")
    data = run / "data"
    tokens, starts = read_split(data, "bible", "test", max_docs=2)
    doc = _first_doc(hf_run / "run" / "corpus", "bible", "test")
    for name, ckpt, exported in [("bible", run / "experts" / "bible" / "checkpoint_last.pt", out / "bible"),
                                 ("average", average, tmp_path / "average")]:
        model = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=False).eval()
        assert type(model).__name__ == "LlamaForCausalLM"
        tok = transformers.AutoTokenizer.from_pretrained(exported, trust_remote_code=False)
        assert tok(doc)["input_ids"] + [tok.eos_token_id] == tokens[:starts[1]].tolist()
        assert tok("a </s> b")["input_ids"] == [1] + encode_text(data, "a </s> b")  # text, as in the data
        assert (tok.bos_token_id, tok.eos_token_id, model.config.bos_token_id) == (1, 2, 1)
        btm = score_split(ckpt, data, "bible", "test", cache_dir=tmp_path / name,
                          context=ContextSettings(max_docs=2))
        with torch.no_grad():
            hf = hf_block_logprobs(model.float(), tokens, starts, 128)
        np.testing.assert_allclose(hf, btm.logprobs, atol=1e-4, rtol=0)


def test_lm_eval_model_uses_the_models_tokenizer_and_separators(hf_run):
    """The lm-eval model ``btm`` on the forest: a string is encoded with the model's tokenizer and
    scored as a document (``</s> <s>`` in front), as transformers scores it."""
    import torch

    from test_lm_eval_btm import Req, make_lm

    transformers = _transformers()
    run = hf_run / "run"
    text, context, continuation = "In the beginning God created", "In the beginning", " God created"
    lm = make_lm(run, run / "data", method="expert", expert="bible")
    ids = lm.tok_encode(text)
    assert ids == transformers.AutoTokenizer.from_pretrained(hf_run / "model")(text)["input_ids"][1:]
    assert lm.eot_token_id == 2 and lm.prefix == [2, 1]
    rolling = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)[0]
    ctx_ids = lm.tok_encode(context)
    (pair, _), = lm.loglikelihood([Req(context, continuation)], disable_tqdm=True)

    from fairseq_ext.checkpoint import load_model

    model = load_model(run / "experts" / "bible" / "checkpoint_last.pt").model.eval()
    full = [2, 1] + ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full[:-1]]))[0][0].float(), -1)
    token_lp = lp.gather(1, torch.tensor(full[1:])[:, None])[:, 0].numpy()
    assert rolling == pytest.approx(float(token_lp[1:].sum()), abs=1e-4)  # the text, not <s>
    assert lm.tok_encode(context + continuation) == ids
    assert pair == pytest.approx(float(token_lp[1 + len(ctx_ids):].sum()), abs=1e-4)


@pytest.mark.slurm
@pytest.mark.slow
def test_hf_seeded_forest_on_slurm(slurm_cluster, small_corpus, tmp_path):
    """The same run on the SLURM test cluster: data, import + seed, the experts as one array."""
    from test_pipeline_slurm import _record, _wait_done

    require_fairseq()
    _transformers()
    save_model_dir(tmp_path / "model", small_corpus)
    config = CONFIG.format(corpus=small_corpus).replace("executor: local", "executor: slurm\nprofile: slurm-test")
    (tmp_path / "run.yaml").write_text(config.replace("max_parallel: 2", "max_parallel: 3"))
    run_dir = tmp_path / "run"
    r = run_btm("run", tmp_path / "run.yaml", "--run-dir", run_dir, check=True)
    assert "submitted 9 jobs" in r.stdout and "seed: imported from hf:" in r.stdout
    _wait_done(slurm_cluster, run_dir, timeout=1200)
    seed = _record(run_dir, "seed")
    assert seed["hf_import"]["source"] == str((tmp_path / "model").resolve())
    trains = [_record(run_dir, f"train.{e}") for e in ("bible", "code_python", "legal")]
    assert all(t["slurm"]["slurm_array_job_id"] and t["started"] >= seed["finished"] for t in trains)
    assert (run_dir / "results" / "results.csv").is_file()
    assert "jobs to submit: 0" in run_btm("run", tmp_path / "run.yaml", "--run-dir", run_dir, check=True).stdout


# ---- bad tokenizers: refused before anything is written ----------------------------------------

def _prepare_refused(corpus: Path, model: Path, out: Path, match: str) -> None:
    from launcher.contract.errors import BtmError
    from fairseq_ext.data_prep import prepare_data

    with pytest.raises(BtmError, match=match):
        prepare_data(corpus, out, tokenizer=f"hf:{model}", workers=1, progress=False)
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_a_tokenizer_without_eos_is_refused(small_corpus, tmp_path):
    from hf_fixtures import corpus_texts, save_tokenizer

    model = save_tokenizer(tmp_path / "m", corpus_texts(small_corpus))
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "eos_token"}))
    (model / "special_tokens_map.json").unlink(missing_ok=True)
    _prepare_refused(small_corpus, model, tmp_path / "data", r"m: the tokenizer has no eos token")


def test_a_vocabulary_larger_than_the_embedding_is_refused(small_corpus, tmp_path):
    from hf_fixtures import corpus_texts, save_tokenizer

    model = save_tokenizer(tmp_path / "m", corpus_texts(small_corpus))
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 300}))
    _prepare_refused(small_corpus, model, tmp_path / "data",
                     r"tokenizer.json has 384 ids but the model's embedding .*config.json vocab_size\) has only 300 rows")

