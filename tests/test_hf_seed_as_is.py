"""``model.init: hf:PATH`` with ``seed_fraction: 0`` (the import is the seed as is), the dense
baseline from the same import, and pickle-only model directories (``model.trust_checkpoint``).

One ``btm run`` on the local executor with a tiny ``LlamaForCausalLM`` and its tokenizer built
here (nothing is downloaded): no seed training, two experts branched from the import, and a
dense baseline that starts from the import too.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import require_fairseq, run_btm
from hf_fixtures import save_model_dir
from launcher.contract.atomic import sha256_file
from launcher.contract.hf_model import hf_files
from test_export_hf import _transformers

pytestmark = pytest.mark.fairseq

CONFIG = """\
name: hf-as-is
corpus:
  path: {corpus}
  tokenizer: hf:{tokenizer}
domains:
  train: [bible, legal]
  eval: [bible, legal]
model:
  preset: llama-tiny
  init: hf:{model}
  trust_checkpoint: {trust}
budget:
  total_updates: 4
  gpus: 1
  seed_fraction: 0
  save_interval_updates: 4
baselines: [dense]
branching:
  sample_docs: 8
evaluation:
  methods: [experts]
executor: local
max_parallel: 1
"""


def _config(corpus: Path, model: Path, tokenizer: Path | None = None, trust: bool = False) -> str:
    return CONFIG.format(corpus=corpus, model=model, tokenizer=tokenizer or model,
                         trust=str(trust).lower())


@pytest.fixture(scope="module")
def as_is(tmp_path_factory, small_corpus) -> dict:
    require_fairseq()
    _transformers()
    base = tmp_path_factory.mktemp("hf_as_is")
    model = save_model_dir(base / "model", small_corpus)
    (base / "run.yaml").write_text(_config(small_corpus, model))
    plan = run_btm("run", base / "run.yaml", "--run-dir", base / "run", "--dry-run", check=True).stdout
    r = run_btm("run", base / "run.yaml", "--run-dir", base / "run", "--no-progress", timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"model": model.resolve(), "run": (base / "run").resolve(), "plan": plan}


def _weights(path: Path) -> dict:
    from fairseq_ext.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def _record(run: Path, stage: str, unit: str | None = None) -> dict:
    return json.loads((run / "records" / (f"{stage}.{unit}.json" if unit else f"{stage}.json")).read_text())


def _plan_row(plan: str, job: str) -> dict[str, str]:
    """The dry-run table's row of ``job``, by column (the columns are fixed-width)."""
    lines = plan.splitlines()
    header = next(line for line in lines if line.startswith("job "))
    row = next(line for line in lines if line.split()[:1] == [job])
    columns = [(m.group(), m.start()) for m in re.finditer(r"\S+", header)]
    ends = [start for _, start in columns[1:]] + [None]
    return {name: row[start:end].strip() for (name, start), end in zip(columns, ends)}


def test_the_plan_shows_no_seed_training(as_is):
    plan = as_is["plan"]
    assert f"seed: imported from hf:{as_is['model']}, used as is" in plan
    assert "seed 0 updates on 1 GPUs; 2 experts x 4 updates" in plan
    seed = _plan_row(plan, "seed")
    assert (seed["updates/unit"], seed["GPU-updates"], seed["tokens"]) == ("-", "-", "-")
    assert _plan_row(plan, "dense")["updates/unit"] == "4"


def test_the_seed_is_the_import_and_the_experts_branch_from_it(as_is, tmp_path):
    from fairseq_ext.hf_import import import_hf

    run = as_is["run"]
    seed = _record(run, "seed")
    assert "train" not in seed and seed["hf_import"]["source"] == str(as_is["model"])
    assert list(seed["outputs"]) == ["seed/checkpoint_last.pt"]  # relative to the run dir
    import_hf(as_is["model"], tmp_path / "ref.pt", preset="llama-tiny", data_dir=run / "data")
    imported = _weights(tmp_path / "ref.pt")
    _assert_same_weights(_weights(run / "seed" / "checkpoint_last.pt"), imported)

    forest = json.loads((run / "forest.json").read_text())
    assert [e["parents"] for e in forest["experts"]] == [{"seed": 1.0}, {"seed": 1.0}]
    for domain in ("bible", "legal"):
        _assert_same_weights(_weights(run / "experts" / domain / "init.pt"), imported)
        assert _record(run, "train", domain)["train"]["num_updates"] == 4  # the whole budget


def test_dense_starts_from_the_import_and_lists_the_model_files(as_is):
    from fairseq_ext.checkpoint import load_checkpoint

    run, model = as_is["run"], as_is["model"]
    dense = _record(run, "dense")
    for path in hf_files(model):
        assert dense["inputs"][str(path)] == sha256_file(path)
    assert dense["params"]["init"] == f"hf:{model}" and dense["hf_import"]["source"] == str(model)
    assert dense["train"]["num_updates"] == 4  # the whole budget, from the import
    _assert_same_weights(_weights(run / "dense" / "hf_import.pt"), _weights(run / "seed" / "checkpoint_last.pt"))
    spec = load_checkpoint(run / "dense" / "checkpoint_last.pt")["extra_state"]["btm"]["train_spec"]
    assert spec["init"] == str(run / "dense" / "hf_import.pt")


def test_pickle_only_weights_need_trust_checkpoint(as_is, small_corpus, tmp_path):
    """The seed stage on a model directory with only ``pytorch_model.bin``: refused, naming the
    file and the key; with ``model.trust_checkpoint: true`` the same weights as the safetensors."""
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(as_is["model"], pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    run = tmp_path / "run"
    shutil.copytree(as_is["run"] / "data", run / "data")  # prepared with the same tokenizer
    config = run / "config.yaml"
    config.write_text(_config(small_corpus, pickled, tokenizer=as_is["model"]))
    refused = run_btm("stage", run, "seed")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{pickled}/pytorch_model.bin" in refused.stderr
    assert "model.trust_checkpoint: true" in refused.stderr and "Traceback" not in refused.stderr
    assert not (run / "seed" / "checkpoint_last.pt").exists()

    config.write_text(_config(small_corpus, pickled, tokenizer=as_is["model"], trust=True))
    run_btm("stage", run, "seed", check=True)
    assert _record(run, "seed")["hf_import"]["files"] == ["pytorch_model.bin"]
    _assert_same_weights(_weights(run / "seed" / "checkpoint_last.pt"),
                         _weights(as_is["run"] / "seed" / "checkpoint_last.pt"))
