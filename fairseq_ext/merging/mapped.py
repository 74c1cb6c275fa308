"""Memory-mapped checkpoints read one tensor at a time, giving each tensor's pages back.

``torch.load(mmap=True)`` maps the whole file; every page a reader touches stays resident (and
counts in the process's RSS) until the file is unmapped. Merging goes parameter by parameter
over all experts at once, so without help it would end up holding every expert in memory.
``MappedCheckpoint.read`` copies one tensor out as float32 and then tells the kernel it no
longer needs that tensor's pages (``madvise(MADV_DONTNEED)``): they are clean, private pages of
the file, so dropping them loses nothing, and a later read simply pages them in again. Only
pages inside this file's own mappings (from /proc/self/maps) are ever released; where that file
does not exist (not Linux) nothing is released and memory grows with the number of experts.
"""
from __future__ import annotations

import ctypes
import mmap
import os

_MADV_DONTNEED = 4
_M_MMAP_THRESHOLD = -3


def _file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges at which ``path`` is mapped into this process."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == target:
                    start, end = parts[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def keep_large_blocks_in_their_own_mappings(threshold: int = 1 << 20) -> None:
    """Make glibc's malloc serve every block >= ``threshold`` bytes from its own mmap.

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB),
    after which tensors up to that size come from the heap, and the heap, fragmented by
    temporaries and output tensors of many sizes, keeps what was freed: a merge's RSS then
    grows with every parameter and every expert (the cause of the old average's 2.29x at N = 2
    and 2.69x at N = 8). A fixed threshold keeps each tensor-sized block in its own mapping,
    returned to the system when freed. It applies to the whole process; nothing else in btm
    relies on the heap keeping large blocks. Not glibc: nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, threshold)


class MappedCheckpoint:
    """A checkpoint's parameters, memory-mapped; ``read(key)`` returns a float32 copy.

    Only the parameters are kept: the rest of the checkpoint (cfg, dictionary) is about a
    megabyte of Python objects per checkpoint, which, kept for every expert, would make memory
    grow with N (0.4x one expert at N = 16 for a 27 MiB model)."""

    def __init__(self, path, *, trust_pickle: bool = False):
        from fairseq_ext.checkpoint import load_checkpoint

        self.path = str(path)
        self.tensors = load_checkpoint(path, trust_pickle=trust_pickle, mmap=True,
                                       verify=False)["model"]
        self._ranges = _file_mappings(path)
        self._madvise = _madvise() if self._ranges else None

    def read(self, key: str):
        import torch

        src = self.tensors[key]
        out = torch.empty(src.shape, dtype=torch.float32)
        out.copy_(src)
        self._release(src)
        return out

    def _release(self, tensor) -> None:
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        for lo, hi in self._ranges:
            if lo <= start and end <= hi:
                first = max(lo, start // mmap.PAGESIZE * mmap.PAGESIZE)
                last = min(hi, -(-end // mmap.PAGESIZE) * mmap.PAGESIZE)
                if last > first:
                    self._madvise(first, last - first, _MADV_DONTNEED)
                return


class ExpertTensors:
    """One parameter of every expert, each read only when it is reached (a Sequence)."""

    def __init__(self, checkpoints: list[MappedCheckpoint], key: str):
        self._checkpoints, self._key = checkpoints, key

    def __len__(self) -> int:
        return len(self._checkpoints)

    def __getitem__(self, i: int):
        return self._checkpoints[i].read(self._key)

    def __iter__(self):
        return (c.read(self._key) for c in self._checkpoints)

