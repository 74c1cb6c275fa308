"""``DATA_DIR/manifest.json`` (and ``tokens.csv`` beside it): what a prepared data directory holds.

One reader (``read_data_manifest``) and one writer (``write_data_manifest``); data prep is the
only writer, everything else reads. Layout (docs/architecture.md, "Data"): ``format_version``,
``domains``, ``train_domains``, tokenizer settings and hashes, ``datasets`` keyed
``<domain>/<split>`` (documents, tokens, bin/idx sha256, source) and ``data_hash`` per dataset.
"""
from __future__ import annotations

import os
from pathlib import Path

from launcher.contract.atomic import atomic_write_json, atomic_write_text, read_versioned_json
from launcher.contract.errors import BtmError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def manifest_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / MANIFEST


def read_data_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared data directory (BtmError if there is none or it is unreadable)."""
    path = manifest_path(data_dir)
    try:
        return read_versioned_json(path, what="data manifest", key="format_version", version=FORMAT_VERSION,
                                   missing=f"{path} not found: run 'btm data prepare CORPUS {data_dir}' first")
    except BtmError as e:
        if not path.exists():
            raise
        # The manifest is what says which datasets are complete, so the datasets go with it.
        raise BtmError(f"{e}; delete the data directory (`rm -r {Path(data_dir)}`) and prepare it again: "
                       f"`btm run` in a run directory (its data stages rebuild it), else "
                       f"`btm data prepare CORPUS {data_dir}`") from None


def write_data_manifest(data_dir: str | os.PathLike, manifest: dict) -> None:
    """Write the manifest and ``tokens.csv``, deriving ``domains`` and ``data_hash`` from
    ``datasets`` (so the three never disagree)."""
    data_dir = Path(data_dir)
    manifest["format_version"] = FORMAT_VERSION
    manifest["domains"] = sorted({key.split("/")[0] for key in manifest["datasets"]})
    manifest["data_hash"] = {k: v["data_hash"] for k, v in sorted(manifest["datasets"].items())}
    rows = ["domain,split,documents,tokens"]
    for key, info in sorted(manifest["datasets"].items()):
        domain, split = key.split("/")
        rows.append(f"{domain},{split},{info['documents']},{info['tokens']}")
    atomic_write_text(data_dir / "tokens.csv", "\n".join(rows) + "\n")
    atomic_write_json(data_dir / MANIFEST, manifest)


def prepared_domains(manifest: dict) -> list[str]:
    """Domains with at least one complete dataset."""
    return sorted({key.split("/")[0] for key in manifest.get("datasets", {})} | set(manifest.get("domains", [])))


def dataset_hash(data_dir: str | os.PathLike, manifest: dict, domain: str, split: str) -> str:
    """The ``data_hash`` of ``<domain>/<split>``; BtmError naming the manifest if it is not there."""
    key = f"{domain}/{split}"
    value = (manifest.get("data_hash") or {}).get(key)
    if not value:
        known = ", ".join(sorted(manifest.get("data_hash") or {})) or "none"
        raise BtmError(f"{manifest_path(data_dir)}: no data_hash for {key!r} (known: {known})")
    return value
