"""Binarizing one domain of a corpus into fairseq mmap datasets (runs in worker processes).

``DATA/<domain>/<split>.bin|.idx``: one item per document, its token ids followed by eos;
``DATA/<domain>/dict.txt``: a copy of the shared dictionary, so stock fairseq tools read a
domain directory as it is. ``fairseq_ext.data_prep`` decides which domains to build and
records the results in the manifest.
"""
from __future__ import annotations

import contextlib
import hashlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from launcher.contract.atomic import atomic_path, atomic_write_bytes, sha256_file
from launcher.contract.corpus import SPLITS, iter_documents
from launcher.contract.logging_setup import quiet_third_party_logging

from fairseq_ext.encoders import data_encoder


@dataclass
class DomainJob:
    """One worker's task (picklable): the split files of ``domain`` and their sha256."""

    domain: str
    out_dir: str
    text_field: str
    sources: dict
    source_sha: dict
    show_progress: bool = False


def binarize_domain(job: DomainJob) -> dict:
    """Read, encode and write every split of one domain; returns what the manifest records.

    All splits are built under temp names and renamed only when every one is complete: all the
    .bin files first, then all the .idx files (ExitStack unwinds in reverse order of entry).
    Old .idx files are removed before any rename, so a crash between the renames leaves a .bin
    without an .idx (an error on load, and not in the manifest, so rebuilt), never a new .bin
    read through an old .idx.
    """
    quiet_third_party_logging()  # a fresh worker process imports fairseq below
    out_dir = Path(job.out_dir)
    encoder = data_encoder(out_dir)
    prefixes = {s: out_dir / job.domain / s for s in SPLITS}
    results = {}
    with contextlib.ExitStack() as stack:
        tmp_idx = {s: stack.enter_context(atomic_path(f"{prefixes[s]}.idx")) for s in SPLITS}
        tmp_bin = {s: stack.enter_context(atomic_path(f"{prefixes[s]}.bin")) for s in SPLITS}
        for split in SPLITS:
            # Documents stream from the file into the temp dataset; bad input raises here and
            # the temp files are removed, so nothing of this domain is written.
            docs = iter_documents(job.sources[split], job.text_field)
            results[split] = _build_split(encoder, docs, tmp_bin[split], tmp_idx[split], job, split)
            results[split].update(source=job.sources[split], source_sha256=job.source_sha[split])
        # A copy of the shared dictionary next to the splits, so stock fairseq tools
        # (fairseq-train/fairseq-eval-lm DATA/<domain>) read a domain directory as it is.
        atomic_write_bytes(out_dir / job.domain / "dict.txt", (out_dir / "dict.txt").read_bytes())
        for split in SPLITS:
            Path(f"{prefixes[split]}.idx").unlink(missing_ok=True)
    return {"domain": job.domain, "splits": results}


def _build_split(encoder, docs, tmp_bin: Path, tmp_idx: Path, job: DomainJob, split: str) -> dict:
    """Write one mmap indexed dataset: item i = document i as the encoder separates it."""
    import numpy as np
    import torch
    from fairseq.data import indexed_dataset
    from tqdm import tqdm

    tokens = documents = 0
    builder = indexed_dataset.make_builder(str(tmp_bin), impl="mmap", vocab_size=encoder.size)
    for doc in tqdm(docs, desc=f"{job.domain}/{split}", unit="doc", leave=False, disable=not job.show_progress):
        ids = encoder.document(doc)
        builder.add_item(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
        tokens += len(ids)
        documents += 1
    builder.finalize(str(tmp_idx))
    return {"documents": documents, "tokens": tokens, "bin_sha256": sha256_file(tmp_bin),
            "idx_sha256": sha256_file(tmp_idx), "data_hash": _data_hash(tmp_bin, tmp_idx)}


def _data_hash(bin_path: Path, idx_path: Path) -> str:
    """sha256 of the .bin bytes followed by the .idx bytes: the identity of one dataset."""
    h = hashlib.sha256()
    for p in (bin_path, idx_path):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def run_jobs(jobs: list[DomainJob], workers: int, progress: bool):
    """Yield each domain's result as it finishes; the first failure stops the rest."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="binarize domains", unit="domain", disable=not progress or not jobs)
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                yield binarize_domain(job)
                bar.update()
            return
        import multiprocessing

        # Not "fork": the caller may hold torch/OpenMP threads (a training test, a notebook),
        # and a forked child that touches their locks can hang. A fresh worker costs one import.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                 mp_context=multiprocessing.get_context(method)) as pool:
            futures = [pool.submit(binarize_domain, job) for job in jobs]
            try:
                for fut in as_completed(futures):
                    yield fut.result()
                    bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()
