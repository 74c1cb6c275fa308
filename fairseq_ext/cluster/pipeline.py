"""One call for the launcher's ``method: cbtm`` data stage: fit, then assign.

    OUT/model/          the fitted model (model.json + model.npz)
    OUT/domains/        cluster_<i>/{train,valid,test}.jsonl + cluster_report.json:
                        the corpus ``btm data prepare`` reads (domains cluster_0..cluster_{k-1})
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from launcher.contract.corpus import DOCUMENT_NUMBERING, find_sources
from launcher.contract.errors import BtmError

from fairseq_ext.cluster.assign import AssignSettings, assign_corpus, cluster_name
from fairseq_ext.cluster.fit import FitSettings, fit_corpus
from fairseq_ext.cluster.model_io import read_model_meta, save_model


def fit_model_dir(corpus_dir, model_dir, settings: FitSettings, force: bool = False) -> bool:
    """Fit and save unless ``model_dir`` already holds a model fitted with the same settings
    on the same corpus (path, and size and mtime of its files) numbered as
    ``launcher.contract.corpus`` numbers documents now. Returns True when it fitted."""
    model_dir = Path(model_dir)
    files = find_sources(corpus_dir, splits=[settings.split], domains=settings.domains)
    wanted = dict(asdict(settings), corpus=str(Path(corpus_dir).resolve()),
                  corpus_files=[[s.key, os.path.getsize(s.path), os.stat(s.path).st_mtime_ns] for s in files],
                  document_numbering=DOCUMENT_NUMBERING)
    if not force and (model_dir / "model.json").exists():
        try:
            saved = read_model_meta(model_dir)["settings"]
        except BtmError:  # a broken or foreign model where ours belongs: fit a new one over it
            saved = {}
        if {key: saved.get(key) for key in wanted} == wanted:
            return False
    model = fit_corpus(corpus_dir, settings)
    model.settings.update(corpus=wanted["corpus"], corpus_files=wanted["corpus_files"])
    save_model(model, model_dir)
    return True


def build_cluster_domains(corpus_dir, out_dir, k: int, *, seed: int = 0,
                          sample_size: int = 100_000, dims: int = 100,
                          domains: list[str] | None = None, text_field: str = "text",
                          num_shards: int = 1, **fit_options) -> dict:
    """Fit k balanced clusters on the corpus's train split and write one domain per cluster.

    Returns ``{"corpus_dir", "domains", "model_dir", "report"}``; ``corpus_dir`` is the
    clustered corpus to prepare. Re-running with the same arguments does no work. k = 1
    gives one domain holding the whole corpus.
    """
    out = Path(out_dir)
    settings = FitSettings(k=k, seed=seed, sample_size=sample_size, dims=dims, domains=domains,
                           text_field=text_field, **fit_options)
    fit_model_dir(corpus_dir, out / "model", settings)
    report = assign_corpus(out / "model", corpus_dir, out / "domains",
                           AssignSettings(domains=domains, text_field=text_field), num_shards)
    return {"corpus_dir": str(out / "domains"), "domains": [cluster_name(c) for c in range(k)],
            "model_dir": str(out / "model"), "report": report}
