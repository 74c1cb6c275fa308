"""Atomic file writes and content hashes.

Every file btm writes goes through here: write a temporary file in the same directory, flush
and fsync it, then ``os.replace`` it over the target. A reader sees the old file or the new
one, never half of one, and a crash or a full disk leaves what was there before untouched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from launcher.contract.errors import BtmError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``.

    For writers that want a file name (``torch.save``, ``np.save``, sentencepiece). On any
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file 0600; outputs on a shared cluster should follow the umask like
    # any other file the user creates.
    os.fchmod(fd, 0o666 & ~_current_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise BtmError(f"could not write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_versioned_json(path: str | os.PathLike, *, what: str, key: str, version: Any,
                        missing: str) -> dict:
    """A JSON manifest btm wrote: a dict whose ``key`` is ``version``; BtmError naming the file
    (``missing`` when there is none, else why it cannot be read or is not ours)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BtmError(missing) from None
    except (OSError, ValueError) as e:
        raise BtmError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict) or data.get(key) != version:
        raise BtmError(f"{path}: not a btm {what} ({key} {version})")
    return data


def atomic_write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = True) -> None:
    """``allow_nan=False``: a NaN or infinity raises ValueError instead of writing the
    non-standard ``NaN`` that other JSON readers refuse (manifests other tools read)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=allow_nan) + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, an output directory that is a file, lies under a file or cannot
    be written (permissions, a read-only filesystem); it need not exist yet. ``what`` names the
    flag or key it came from. Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BtmError(f"{what} {path} is a file, not a directory; choose another path")
    existing = next(p for p in (path, *path.parents) if p.exists())  # under a file: exists() is False
    if not existing.is_dir():
        raise BtmError(f"{what} {path}: {existing} is a file, so no directory can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):  # access(2) also says EROFS on a read-only mount
        raise BtmError(f"{what} {path}: {existing} is not writable (permissions or a read-only filesystem)")
    return path
