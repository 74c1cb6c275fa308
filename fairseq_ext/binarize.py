"""Binarizing shards of a corpus into fairseq mmap datasets (runs in worker processes, or in
the tasks of a SLURM array: see ``fairseq_ext.shards`` for the files and the resume rule).

A shard's items are its documents as the data's encoder makes them (``fairseq_ext.encoders``:
token ids followed by eos, bos first for hf tokenizers that add one); ids are written as they
are encoded (``Encoder.document_parts`` bounds one encode call for sentencepiece), in the
dtype fairseq's mmap builder would choose, so a merged split is byte for byte what one
builder would write.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

from launcher.contract.atomic import atomic_path, atomic_write_json, read_versioned_json
from launcher.contract.corpus import iter_documents
from launcher.contract.errors import BtmError
from launcher.contract.logging_setup import quiet_third_party_logging

from fairseq_ext.encoders import data_encoder
from fairseq_ext.shards import PLAN_VERSION, Shard, write_index


def current_record(out_dir: Path, shard: Shard, tokenizer_sha256: str) -> dict | None:
    """The shard's record if the shard is done: same source sha256, byte range and tokenizer,
    and its files still of the recorded sizes; else None (the shard is to be redone)."""
    prefix = shard.prefix(out_dir)
    try:
        record = read_versioned_json(prefix.with_suffix(".json"), what="shard record", key="format_version",
                                     version=PLAN_VERSION, missing="")
    except BtmError:
        return None
    if record.get("shard") != asdict(shard) or record.get("tokenizer_sha256") != tokenizer_sha256:
        return None
    try:
        if (prefix.with_suffix(".bin").stat().st_size == record["bin_bytes"]
                and prefix.with_suffix(".idx").stat().st_size == record["idx_bytes"]):
            return record
    except OSError:
        pass
    return None


def binarize_shard(out_dir: str, shard: Shard, text_field: str, tokenizer_sha256: str) -> dict:
    """Encode one shard into its .bin/.idx, then write its record (runs in a worker process)."""
    import numpy as np
    from fairseq.data.indexed_dataset import best_fitting_int_dtype

    quiet_third_party_logging()  # a fresh worker process imports fairseq
    out_dir = Path(out_dir)
    prefix = shard.prefix(out_dir)
    for stale in prefix.parent.glob(f".{prefix.name}.*.tmp"):  # a killed attempt at this shard
        stale.unlink(missing_ok=True)
    encoder = data_encoder(out_dir)
    dtype = best_fitting_int_dtype(encoder.size)
    sizes = []
    with atomic_path(prefix.with_suffix(".idx")) as tmp_idx, atomic_path(prefix.with_suffix(".bin")) as tmp_bin:
        with open(tmp_bin, "wb") as out:
            for doc in iter_documents(shard.source, text_field, (shard.start, shard.end)):
                n = 0
                for part in encoder.document_parts(doc):
                    ids = np.asarray(part, dtype=dtype)
                    out.write(ids.tobytes())
                    n += len(ids)
                sizes.append(n)
        write_index(tmp_idx, dtype, np.asarray(sizes, dtype=np.int32))
        bin_bytes, idx_bytes = tmp_bin.stat().st_size, tmp_idx.stat().st_size
    record = {"format_version": PLAN_VERSION, "shard": asdict(shard), "tokenizer_sha256": tokenizer_sha256,
              "documents": len(sizes), "tokens": int(sum(sizes)), "bin_bytes": bin_bytes, "idx_bytes": idx_bytes}
    atomic_write_json(prefix.with_suffix(".json"), record)
    return record


def run_shards(out_dir: Path, shards: list[Shard], text_field: str, tokenizer_sha256: str, workers: int,
               progress: bool):
    """Binarize the shards that are not current; yield each one's record as it finishes (the
    first failure stops the rest)."""
    from tqdm import tqdm

    todo = [s for s in shards if current_record(out_dir, s, tokenizer_sha256) is None]
    bar = tqdm(total=len(todo), desc="binarize shards", unit="shard", disable=not progress or not todo)
    try:
        if workers == 1 or len(todo) <= 1:
            for shard in todo:
                yield binarize_shard(str(out_dir), shard, text_field, tokenizer_sha256)
                bar.update()
            return
        import multiprocessing

        # Not "fork": the caller may hold torch/OpenMP threads (a training test, a notebook),
        # and a forked child that touches their locks can hang. A fresh worker costs one import.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                                 mp_context=multiprocessing.get_context(method)) as pool:
            futures = [pool.submit(binarize_shard, str(out_dir), s, text_field, tokenizer_sha256) for s in todo]
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
