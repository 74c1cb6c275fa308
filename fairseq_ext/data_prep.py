"""``btm data prepare``: one shared tokenizer and one fairseq dataset per (domain, split).

Data flow (contract: "Data" in docs/architecture.md; user guide: docs/data.md)::

    CORPUS/<domain>/<split>.{jsonl,jsonl.gz,txt}      read by launcher.contract.corpus
      -> balanced sample of the training domains' train splits -> spm.model, spm.vocab
      -> dict.txt (fairseq Dictionary; symbol i == sentencepiece piece i)
                                                      fairseq_ext.spm_tokenizer
      -> DATA/<domain>/<split>.bin|.idx (mmap indexed dataset, one item per document + eos)
         and DATA/<domain>/dict.txt (a copy, so stock fairseq tools read DATA/<domain>)
                                                      fairseq_ext.binarize
      -> tokens.csv, manifest.json                    launcher.contract.data_manifest

This module decides what to (re)build and keeps the manifest; it also re-exports the
tokenizer's public API (``encode_text``, ``decode_ids``, ``load_dictionary``, the special ids),
which callers import from here.

Re-runs: a domain is skipped when the manifest says it was built from the same input bytes
with the same tokenizer and its .bin/.idx still hash to the recorded values. A re-run whose
tokenizer settings or tokenizer training data differ from the manifest's is an error (the
existing data may already be used by trained experts) unless ``overwrite=True``, which
rebuilds everything.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from launcher.contract.atomic import sha256_file
from launcher.contract.corpus import SPLITS, find_split_file, list_domains
from launcher.contract.data_manifest import FORMAT_VERSION, MANIFEST, read_data_manifest, write_data_manifest
from launcher.contract.errors import BtmError
from launcher.contract.names import validate_name

from fairseq_ext import binarize, encoders, spm_tokenizer
from fairseq_ext.encoders import decode_ids, encode_text, load_dictionary
from fairseq_ext.spm_tokenizer import BOS_ID, EOS_ID, N_SPECIAL, PAD_ID, UNK_ID, TokenizerSettings

__all__ = ["BOS_ID", "EOS_ID", "N_SPECIAL", "PAD_ID", "UNK_ID", "TokenizerSettings", "decode_ids",
           "encode_text", "load_dictionary", "prepare_data"]


def prepare_data(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 domains: list[str] | None = None, train_domains: list[str] | None = None,
                 vocab_size: int = 8000, text_field: str = "text", workers: int = 2, seed: int = 1,
                 sample_chars: int = 1_000_000, character_coverage: float = 0.9995,
                 overwrite: bool = False, progress: bool | None = None,
                 tokenizer: str | None = None) -> dict:
    """Prepare ``out_dir`` from ``corpus_dir`` and return the manifest (see module docstring).

    ``domains`` selects corpus domains (default: all subdirectories); ``train_domains`` (default:
    ``domains``) train the tokenizer. ``progress`` shows tqdm bars (default: when stderr is a TTY).
    ``tokenizer``: ``hf:PATH`` encodes with that transformers model's tokenizer in the model's
    ids instead of training sentencepiece (``fairseq_ext.encoders``; the sentencepiece settings
    are then unused).
    """
    import filelock

    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    available = list_domains(corpus_dir)
    domains = _check_domains(domains or available, available, corpus_dir,
                             "--domains" if domains else f"domain directory of {corpus_dir}")
    train_domains = _check_domains(train_domains or domains, domains, corpus_dir, "--train-domains")
    _check_positive("vocab_size", vocab_size, minimum=N_SPECIAL + 256 + 1)
    _check_positive("workers", workers)
    _check_positive("sample_chars", sample_chars)
    if not isinstance(text_field, str) or not text_field:
        raise BtmError(f"invalid text field {text_field!r}: give a non-empty JSON field name")
    if not 0.98 <= character_coverage <= 1.0:  # sentencepiece's own limits
        raise BtmError(f"invalid character_coverage {character_coverage!r}: use a value in [0.98, 1.0]")
    if progress is None:
        progress = sys.stderr.isatty()

    # Fail on structural problems (missing/empty split files) before writing anything.
    sources = {(d, s): find_split_file(corpus_dir, d, s) for d in domains for s in SPLITS}
    settings = TokenizerSettings(vocab_size=vocab_size, train_domains=tuple(train_domains),
                                 sample_chars=sample_chars, seed=seed,
                                 character_coverage=character_coverage, text_field=text_field)

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out_dir / ".prepare.lock"))
    try:
        lock.acquire(timeout=5)
    except filelock.Timeout:
        raise BtmError(f"{out_dir} is being prepared by another process (lock {lock.lock_file})") from None
    try:
        _remove_stale_temp_files(out_dir)
        source_sha = {key: sha256_file(p) for key, p in sources.items()}
        manifest = _prepare_tokenizer(out_dir, settings, sources, source_sha, overwrite, progress, tokenizer)
        jobs = [binarize.DomainJob(domain=d, out_dir=str(out_dir), text_field=text_field,
                                   sources={s: str(sources[d, s].resolve()) for s in SPLITS},
                                   source_sha={s: source_sha[d, s] for s in SPLITS},
                                   show_progress=progress and workers == 1)
                for d in domains if not _domain_is_current(out_dir, manifest, d, sources, source_sha)]
        stale = [key for key in manifest["datasets"] if key.split("/")[0] in {j.domain for j in jobs}]
        if stale:  # the manifest only ever lists datasets that are current and complete
            for key in stale:
                del manifest["datasets"][key]
            write_data_manifest(out_dir, manifest)
        for result in binarize.run_jobs(jobs, workers, progress):
            _record_domain(out_dir, manifest, result)
        return manifest
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------
# Tokenizer: reuse the recorded one or train a new one


def _tokenizer_key(settings: TokenizerSettings, source_sha: dict) -> dict:
    """What the tokenizer was built from; a re-run must match it to reuse spm.model/dict.txt."""
    return {"settings": settings.as_dict(),
            "train_sources_sha256": {d: source_sha[d, "train"] for d in settings.train_domains}}


def _prepare_tokenizer(out_dir: Path, settings: TokenizerSettings, sources: dict, source_sha: dict,
                       overwrite: bool, progress: bool, tokenizer: str | None) -> dict:
    """Reuse the recorded tokenizer if it matches, else train (or copy) one; returns the manifest."""
    key = _tokenizer_key(settings, source_sha) if tokenizer is None else encoders.hf_tokenizer_key(tokenizer)
    old = _read_manifest_if_any(out_dir)
    if old is not None and old.get("tokenizer") != key:
        if not overwrite:
            raise BtmError(_describe_mismatch(out_dir, old.get("tokenizer") or {}, key))
        _remove_outputs(out_dir, old)
        old = None
    if old is not None and _tokenizer_files_match(out_dir, old):
        return old
    if old is not None:  # recorded but the files changed or vanished: rebuild everything
        _remove_outputs(out_dir, old)

    if tokenizer is None:
        trained = spm_tokenizer.train_tokenizer(out_dir, settings, sources, progress)
        trained["spm_model_sha256"] = sha256_file(out_dir / "spm.model")
        described = {**settings.as_dict(), "special_ids": {"bos": BOS_ID, "pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}}
    else:
        trained = encoders.prepare_hf_tokenizer(out_dir, tokenizer)
        described = {"hf_tokenizer": tokenizer, "text_field": settings.text_field,
                     "special_ids": trained.pop("special_ids"), "vocab_rows": trained["vocab_size"]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "domains": [],
        "train_domains": list(settings.train_domains),
        "splits": list(SPLITS),
        **trained,
        "dict_sha256": sha256_file(out_dir / "dict.txt"),
        "tokenizer": key,
        "settings": {**described, "dataset_impl": "mmap", "item": "document token ids + eos (bos first when the hf tokenizer adds one)",
                     "tokens_count": "including the eos of every document"},
        "data_hash": {},
        "datasets": {},
    }
    write_data_manifest(out_dir, manifest)
    return manifest


def _tokenizer_files_match(out_dir: Path, manifest: dict) -> bool:
    try:
        name, key = ((encoders.HF_TOKENIZER, "hf_tokenizer_sha256") if "hf_tokenizer_sha256" in manifest
                     else ("spm.model", "spm_model_sha256"))
        return (sha256_file(out_dir / name) == manifest[key]
                and sha256_file(out_dir / "dict.txt") == manifest["dict_sha256"])
    except (OSError, KeyError):
        return False


def _describe_mismatch(out_dir: Path, old: dict, new: dict) -> str:
    diffs = []
    for k, v in new.get("settings", {}).items():
        if old.get("settings", {}).get(k) != v:
            diffs.append(f"{k}: {old.get('settings', {}).get(k)!r} -> {v!r}")
    for d, sha in new.get("train_sources_sha256", {}).items():
        if old.get("train_sources_sha256", {}).get(d) != sha:
            diffs.append(f"train split of {d!r} changed")
    what = "; ".join(diffs) or "tokenizer inputs changed"
    return (f"{out_dir} was prepared with a different tokenizer ({what}); its data may already be "
            "used by trained models. Use a new output directory, or pass --overwrite to rebuild it")


# --------------------------------------------------------------------------------------------
# Manifest


def _read_manifest_if_any(out_dir: Path) -> dict | None:
    if not (out_dir / MANIFEST).exists():
        return None
    return read_data_manifest(out_dir)


def _record_domain(out_dir: Path, manifest: dict, result: dict) -> None:
    for split, info in result["splits"].items():
        manifest["datasets"][f"{result['domain']}/{split}"] = info
    write_data_manifest(out_dir, manifest)


def _domain_is_current(out_dir: Path, manifest: dict, domain: str, sources: dict, source_sha: dict) -> bool:
    """Recorded from the same input bytes and text field, and its files still hash as recorded."""
    try:
        if sha256_file(out_dir / domain / "dict.txt") != manifest["dict_sha256"]:
            return False
    except OSError:
        return False
    for split in SPLITS:
        info = manifest["datasets"].get(f"{domain}/{split}")
        if info is None or info.get("source_sha256") != source_sha[domain, split]:
            return False
        prefix = out_dir / domain / split
        try:
            if (sha256_file(prefix.with_suffix(".bin")) != info["bin_sha256"]
                    or sha256_file(prefix.with_suffix(".idx")) != info["idx_sha256"]):
                return False
        except OSError:
            return False
    return True


def _remove_outputs(out_dir: Path, manifest: dict) -> None:
    """Delete the files a previous prepare wrote (and only those), manifest last."""
    for key in manifest.get("datasets", {}):
        domain, split = key.split("/")
        validate_name(domain, "domain name in manifest")
        for name in (f"{split}.bin", f"{split}.idx", "dict.txt"):
            (out_dir / domain / name).unlink(missing_ok=True)
    for name in ("spm.model", "spm.vocab", encoders.HF_TOKENIZER, "dict.txt", "tokens.csv", MANIFEST):
        (out_dir / name).unlink(missing_ok=True)


def _remove_stale_temp_files(out_dir: Path) -> None:
    """Temp files of a killed run (atomic writes name them ``.<target>.<random>.tmp``)."""
    for d in [out_dir, *[p for p in out_dir.iterdir() if p.is_dir()]]:
        for p in d.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def _check_domains(selected, available: list[str], corpus_dir: Path, option: str) -> list[str]:
    if isinstance(selected, str):
        selected = [s for s in selected.split(",") if s]
    selected = list(selected)
    if not selected:
        raise BtmError(f"{option} is empty: name at least one domain")
    for d in selected:
        validate_name(d, f"domain name in {option}")
        if d not in available:
            raise BtmError(f"{option}: domain {d!r} not found (choose from {', '.join(available)} "
                           f"in {corpus_dir})")
    if len(set(selected)) != len(selected):
        raise BtmError(f"{option} names a domain twice: {', '.join(selected)}")
    return sorted(selected)


def _check_positive(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BtmError(f"invalid {name} {value!r}: must be an integer >= {minimum}")

