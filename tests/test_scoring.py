"""Scoring one expert on one split (fairseq_ext/scoring.py): equal to fairseq-eval-lm, cached."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from eval_fixtures import make_expert, tiny_data, tiny_experts  # noqa: F401
from launcher.contract.errors import BtmError

pytestmark = pytest.mark.fairseq

# fairseq's own eval_lm entry point; prints its result dict at full precision.
EVAL_LM = """
import json, sys
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import eval_lm
args = options.parse_args_and_arch(options.get_eval_lm_parser(), sys.argv[1:])
r = eval_lm.main(convert_namespace_to_omegaconf(args))
print("RESULT " + json.dumps({"loss": float(r["loss"]), "perplexity": float(r["perplexity"])}))
"""


def fairseq_eval_lm(data_dir, checkpoint, subset, tokens_per_sample, context_window) -> float:
    """Perplexity from `fairseq_cli.eval_lm` with `--user-dir fairseq_ext`, in a subprocess."""
    argv = [sys.executable, "-c", EVAL_LM, str(data_dir), "--path", str(checkpoint),
            "--user-dir", str(REPO / "fairseq_ext"), "--task", "language_modeling",
            "--gen-subset", subset, "--tokens-per-sample", str(tokens_per_sample),
            "--context-window", str(context_window), "--sample-break-mode", "none",
            "--batch-size", "4", "--cpu", "--no-progress-bar"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])["perplexity"]


@pytest.mark.parametrize("context_window", [0, 16])
def test_perplexity_equals_fairseq_eval_lm(tiny_data, tiny_experts, tmp_path, context_window):
    from fairseq_ext.scoring import ContextSettings, score_split

    ctx = ContextSettings(tokens_per_sample=64, context_window=context_window, reset_at_doc=False)
    scores = score_split(tiny_experts["legal"], tiny_data, "legal", "test", cache_dir=tmp_path, context=ctx)
    expected = fairseq_eval_lm(tiny_data, tiny_experts["legal"], "legal/test", 64, context_window)
    assert math.exp(scores.nll) == pytest.approx(expected, rel=1e-3)
    # One forward pass per block of (tokens_per_sample - context_window) new targets.
    assert scores.forward_passes == math.ceil(scores.tokens / (64 - context_window))


def test_reset_at_doc_scores_each_document_like_eval_lm_on_that_document_alone(tiny_data, tiny_experts,
                                                                               tmp_path):
    import torch
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_int_dtype

    from fairseq_ext.scoring import ContextSettings, read_split, score_split

    ctx = ContextSettings(tokens_per_sample=64, context_window=16, reset_at_doc=True)
    scores = score_split(tiny_experts["bible"], tiny_data, "bible", "test", cache_dir=tmp_path, context=ctx)
    tokens, starts = read_split(tiny_data, "bible", "test")
    np.testing.assert_array_equal(scores.doc_starts, starts)
    np.testing.assert_array_equal(scores.targets, tokens)
    # Document 1 on its own, as a one-item dataset next to dict.txt.
    a, b = int(starts[1]), int(starts[2])
    one = tmp_path / "one"
    (one / "x").mkdir(parents=True)
    (one / "dict.txt").write_bytes((tiny_data / "dict.txt").read_bytes())
    builder = MMapIndexedDatasetBuilder(str(one / "x" / "test.bin"), dtype=best_fitting_int_dtype(1000))
    builder.add_item(torch.from_numpy(tokens[a:b]))
    builder.finalize(str(one / "x" / "test.idx"))
    expected = fairseq_eval_lm(one, tiny_experts["bible"], "x/test", 64, 16)
    assert math.exp(-scores.logprobs[a:b].astype(np.float64).mean()) == pytest.approx(expected, rel=1e-3)


def test_a_cache_hit_runs_no_forward_pass(tiny_data, tiny_experts, tmp_path):
    from fairseq_ext.scoring import ContextSettings, score_split

    ctx = ContextSettings(tokens_per_sample=64)
    first = score_split(tiny_experts["code_python"], tiny_data, "legal", "valid", cache_dir=tmp_path, context=ctx)
    assert first.forward_passes > 0 and first.logprobs.dtype == np.float32
    again = score_split(tiny_experts["code_python"], tiny_data, "legal", "valid", cache_dir=tmp_path, context=ctx)
    assert again.forward_passes == 0
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    assert list(tmp_path.iterdir()) == [first.path]
    # Other context settings are another cache entry.
    other = score_split(tiny_experts["code_python"], tiny_data, "legal", "valid", cache_dir=tmp_path,
                        context=ContextSettings(tokens_per_sample=64, context_window=8))
    assert other.forward_passes > 0 and other.path != first.path
    # A corrupt cache file is rescored, not trusted.
    first.path.write_bytes(b"not an npz")
    redo = score_split(tiny_experts["code_python"], tiny_data, "legal", "valid", cache_dir=tmp_path, context=ctx)
    assert redo.forward_passes == first.forward_passes
    np.testing.assert_array_equal(redo.logprobs, first.logprobs)


def test_a_changed_checkpoint_is_rescored(tiny_data, tmp_path):
    from fairseq_ext.scoring import ContextSettings, score_split

    ck = make_expert(tiny_data, tmp_path / "e.pt", domain=None, seed=5)
    ctx = ContextSettings(tokens_per_sample=64, max_docs=2)
    a = score_split(ck, tiny_data, "bible", "valid", cache_dir=tmp_path / "s", context=ctx)
    ck.unlink()
    make_expert(tiny_data, ck, domain="bible", seed=5)
    b = score_split(ck, tiny_data, "bible", "valid", cache_dir=tmp_path / "s", context=ctx)
    assert b.forward_passes > 0 and b.key["checkpoint_sha256"] != a.key["checkpoint_sha256"]
    assert len(b.doc_starts) == 2
    # Replaced without its sidecar (the file is now newer than the sidecar): the cache is not
    # trusted (the file is hashed) and loading refuses the mismatch.
    import os
    import time

    other = make_expert(tiny_data, tmp_path / "other.pt", domain="legal", seed=6)
    time.sleep(0.01)
    ck.write_bytes(other.read_bytes())
    os.utime(Path(str(ck) + ".sha256"), ns=(0, 0))
    from fairseq_ext.scoring import checkpoint_sha256
    from launcher.contract.atomic import sha256_file

    assert checkpoint_sha256(ck) == sha256_file(ck) != b.key["checkpoint_sha256"]
    with pytest.raises(BtmError, match="does not match its sidecar"):
        score_split(ck, tiny_data, "bible", "valid", cache_dir=tmp_path / "s", context=ctx)


def test_bad_inputs_name_the_culprit(tiny_data, tiny_experts, tmp_path):
    from fairseq_ext.scoring import ContextSettings, score_split

    ck = tiny_experts["legal"]
    with pytest.raises(BtmError, match="no data_hash for 'fiction/test'"):
        score_split(ck, tiny_data, "fiction", "test", cache_dir=tmp_path)
    with pytest.raises(BtmError, match="checkpoint not found"):
        score_split(tmp_path / "nope.pt", tiny_data, "legal", "test", cache_dir=tmp_path)
    with pytest.raises(BtmError, match="context_window \\(64\\) must be smaller"):
        score_split(ck, tiny_data, "legal", "test", cache_dir=tmp_path,
                    context=ContextSettings(tokens_per_sample=64, context_window=64))
    with pytest.raises(BtmError, match="exceeds the model's 64 positions"):
        score_split(ck, tiny_data, "legal", "test", cache_dir=tmp_path,
                    context=ContextSettings(tokens_per_sample=128))
    with pytest.raises(BtmError, match="invalid domain"):
        score_split(ck, tiny_data, "../legal", "test", cache_dir=tmp_path)
