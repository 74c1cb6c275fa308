"""Sharded binarization: the split files cut into byte ranges, each binarized on its own (one
array task, or one worker of a pool), then concatenated into each split's dataset.

Files (all in ``DATA/``)::

    shards.json                                 the plan: every shard's source, byte range, source sha256
                                                (shards.one_job.json: a one-process prepare's plan)
    .shards/<domain>/<split>/<index>.bin|.idx   one shard's mmap dataset (items: document ids + eos)
    .shards/<domain>/<split>/<index>.json       its record, written last: the shard is done

Why merge into one ``<split>.bin|.idx`` per split (rather than have the loader read a list of
shards): every reader of a domain (training, scoring, stock fairseq tools, the manifest's
``data_hash``) keeps reading one dataset, and the bytes are the same whatever the shard count.
A merge only copies bytes (disk speed) and holds 12 bytes per document of index in memory.

Resume: a shard is redone when its record is missing or names another source sha256, byte
range or tokenizer, or its files are gone or of another size. A task killed mid-shard leaves
only temp files (``.<name>.<random>.tmp``), which the next attempt at that shard removes; the
record is written after the files, so a half-written shard is never taken for a done one.

Memory: documents stream from the byte range; a document is encoded in pieces
(``spm_tokenizer.text_chunks``) whose ids go straight to the file, so a task holds about one
document line (raw bytes, the decoded text, the JSON object: a few times its size) plus one
piece's ids. See docs/data.md ("Sharding") for the measured bound.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.contract.atomic import atomic_path, atomic_write_json, read_versioned_json
from launcher.contract.corpus import shard_ranges
from launcher.contract.errors import BtmError

PLAN = "shards.json"  # the pipeline's plan (data_plan -> data_shard array -> data)
# The plan of a one-process prepare (``btm data prepare``, and the data_incremental and
# cluster stages adding domains): its own file, so it never rewrites the pipeline's plan.
ONE_JOB_PLAN = "shards.one_job.json"
SHARD_DIR = ".shards"
PLAN_VERSION = 1
_IDX_MAGIC = b"MMIDIDX\x00\x00"  # fairseq's MMapIndexedDataset index, version 1


@dataclass(frozen=True)
class Shard:
    domain: str
    split: str
    index: int
    source: str
    source_sha256: str
    start: int  # byte range [start, end) of the source, cut at document boundaries
    end: int

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.split}/{self.index:05d}"

    def prefix(self, out_dir: Path) -> Path:
        return Path(out_dir) / SHARD_DIR / self.domain / self.split / f"{self.index:05d}"

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_shards(sources: dict, source_sha: dict, shard_bytes: int) -> list[Shard]:
    """The shards of every (domain, split) source file, in (domain, split, index) order."""
    shards = []
    for (domain, split), path in sorted(sources.items()):
        for i, (start, end) in enumerate(shard_ranges(path, shard_bytes)):
            shards.append(Shard(domain, split, i, str(Path(path).resolve()), source_sha[domain, split], start, end))
    return shards


def write_plan(out_dir: Path, shards: list[Shard], *, shard_bytes: int, text_field: str, tokenizer_sha256: str,
               name: str = PLAN) -> None:
    """Write ``shards.json``, unless it already says the same (a no-op re-run rewrites nothing)."""
    plan = {"format_version": PLAN_VERSION, "shard_bytes": shard_bytes, "text_field": text_field,
            "tokenizer_sha256": tokenizer_sha256, "shards": [asdict(s) for s in shards]}
    path = Path(out_dir) / name
    try:
        if json.loads(path.read_text(encoding="utf-8")) == plan:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, plan)


def read_plan(out_dir: Path, name: str = PLAN) -> dict:
    plan = read_versioned_json(Path(out_dir) / name, what="shard plan", key="format_version", version=PLAN_VERSION,
                               missing=f"{Path(out_dir) / name} not found: the data plan step has not run")
    plan["shards"] = [Shard(**s) for s in plan["shards"]]
    return plan


def assign_tasks(shards: list[Shard], tasks: int) -> list[list[Shard]]:
    """Spread the shards over ``tasks`` tasks with equal bytes: largest first, each to the
    least loaded task (ties: the lower task). Deterministic, so every array task computes the
    same assignment from the plan."""
    loads = [[0, t, []] for t in range(tasks)]
    for shard in sorted(shards, key=lambda s: (-s.size, s.key)):
        task = min(loads, key=lambda x: (x[0], x[1]))
        task[0] += shard.size
        task[2].append(shard)
    return [sorted(t[2], key=lambda s: s.key) for t in loads]


def write_index(path: Path, dtype, sizes) -> None:
    """A fairseq mmap index (``MMapIndexedDataset.Index.writer``'s bytes), built with numpy so
    a merge of many documents needs no Python list per document."""
    import numpy as np
    from fairseq.data.indexed_dataset import _dtype_header_code

    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(_IDX_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", _dtype_header_code(dtype)))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))


def read_sizes(idx_path: Path):
    """The item sizes (int32) and dtype of a fairseq mmap index."""
    import numpy as np
    from fairseq.data.indexed_dataset import _code_to_dtype

    with open(idx_path, "rb") as f:
        if f.read(9) != _IDX_MAGIC or struct.unpack("<Q", f.read(8)) != (1,):
            raise BtmError(f"{idx_path} is not a fairseq mmap index")
        dtype = _code_to_dtype[struct.unpack("<B", f.read(1))[0]]
        n = struct.unpack("<Q", f.read(8))[0]
        return np.fromfile(f, dtype=np.int32, count=n), dtype


def merge_split(out_dir: Path, shards: list[Shard]) -> dict:
    """Concatenate the shards of one (domain, split), in order, into ``<domain>/<split>.bin|.idx``;
    returns what the manifest records. The .bin is renamed before the .idx, and the old .idx is
    removed first, so a crash in between leaves a .bin without an .idx (rebuilt), never a new
    .bin read through an old .idx."""
    import numpy as np

    out_dir = Path(out_dir)
    domain, split = shards[0].domain, shards[0].split
    prefix = out_dir / domain / split
    bin_sha, idx_sha, data_hash = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    sizes, dtypes = [], set()
    with atomic_path(f"{prefix}.idx") as tmp_idx:
        with atomic_path(f"{prefix}.bin") as tmp_bin, open(tmp_bin, "wb") as out:
            for shard in shards:
                shard_sizes, dtype = read_sizes(shard.prefix(out_dir).with_suffix(".idx"))
                sizes.append(shard_sizes)
                dtypes.add(dtype)
                with open(shard.prefix(out_dir).with_suffix(".bin"), "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
                        bin_sha.update(block)
                        data_hash.update(block)
            if len(dtypes) != 1:
                raise BtmError(f"shards of {domain}/{split} hold different token dtypes {dtypes}: re-run the plan")
            all_sizes = np.concatenate(sizes)
            if not len(all_sizes):
                raise BtmError(f"{shards[0].source} holds no documents (every line is blank or has an empty text)")
            write_index(tmp_idx, dtypes.pop(), all_sizes)
            Path(f"{prefix}.idx").unlink(missing_ok=True)
        with open(tmp_idx, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                idx_sha.update(block)
                data_hash.update(block)
    return {"documents": int(len(all_sizes)), "tokens": int(all_sizes.sum()), "shards": len(shards),
            "bin_sha256": bin_sha.hexdigest(), "idx_sha256": idx_sha.hexdigest(), "data_hash": data_hash.hexdigest(),
            "source": shards[0].source, "source_sha256": shards[0].source_sha256}


def remove_shards(out_dir: Path, shards: list[Shard]) -> None:
    """Delete merged shards (records first: a shard without its record is not done)."""
    for shard in shards:
        prefix = shard.prefix(out_dir)
        for suffix in (".json", ".bin", ".idx"):
            prefix.with_suffix(suffix).unlink(missing_ok=True)
