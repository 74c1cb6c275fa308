"""The model-side tests' DATA dir: real `btm data prepare` output of the small corpus."""
from __future__ import annotations

from pathlib import Path


def build_data(corpus: Path, out: Path, domains: list[str]) -> Path:
    from fairseq_ext.data_prep import prepare_data

    if not (out / "manifest.json").exists():
        prepare_data(corpus, out, domains=domains, vocab_size=400, workers=1,
                     sample_chars=50_000, progress=False)
    return out
