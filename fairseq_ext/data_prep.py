"""``btm data prepare``: one shared tokenizer and one fairseq dataset per (domain, split).

Data flow (contract: "Data" in docs/architecture.md; user guide: docs/data.md)::

    CORPUS/<domain>/<split>.{jsonl,jsonl.gz,txt}      read by launcher.contract.corpus
      -> balanced sample of the training domains' train splits -> spm.model, spm.vocab
      -> dict.txt (fairseq Dictionary; symbol i == sentencepiece piece i)
                                                      fairseq_ext.spm_tokenizer
      -> DATA/shards.json: each split file cut into byte ranges at document boundaries
                                                      fairseq_ext.shards (plan_data)
      -> DATA/.shards/<domain>/<split>/<i>.bin|.idx|.json, one per shard
                                                      fairseq_ext.binarize (binarize_task)
      -> DATA/<domain>/<split>.bin|.idx (mmap indexed dataset, one item per document + eos:
         the shards concatenated) and DATA/<domain>/dict.txt (a copy, so stock fairseq tools
         read DATA/<domain>)                          fairseq_ext.shards (merge_data)
      -> tokens.csv, manifest.json                    launcher.contract.data_manifest

The three steps run in one process (``prepare_data``) or as three pipeline stages, the middle
one an array of tasks (docs/data.md, "Sharding").

This module decides what to (re)build and keeps the manifest; it also re-exports the
tokenizer's public API (``encode_text``, ``decode_ids``, ``load_dictionary``, the special ids),
which callers import from here.

Re-runs: a (domain, split) is not planned when the manifest says it was built from the same
input bytes with the same tokenizer and its .bin/.idx still hash to the recorded values; a
shard is not redone when its record matches the plan (``binarize.current_record``). A re-run whose
tokenizer settings or tokenizer training data differ from the manifest's is an error (the
existing data may already be used by trained experts) unless ``overwrite=True``, which
rebuilds everything.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from launcher.contract.atomic import atomic_write_bytes, sha256_file
from launcher.contract.corpus import SPLITS, find_split_file, list_domains
from launcher.contract.data_manifest import FORMAT_VERSION, MANIFEST, read_data_manifest, write_data_manifest
from launcher.contract.errors import BtmError
from launcher.contract.names import validate_name

from fairseq_ext import binarize, encoders, shards, spm_tokenizer
from fairseq_ext.encoders import decode_ids, encode_text, load_dictionary
from fairseq_ext.spm_tokenizer import BOS_ID, EOS_ID, N_SPECIAL, PAD_ID, UNK_ID, TokenizerSettings

__all__ = ["BOS_ID", "EOS_ID", "N_SPECIAL", "PAD_ID", "UNK_ID", "TokenizerSettings", "binarize_task", "decode_ids",
           "encode_text", "load_dictionary", "merge_data", "plan_data", "prepare_data"]


DEFAULT_SHARD_BYTES = 256 << 20  # a small corpus is one shard per split


def prepare_data(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 domains: list[str] | None = None, train_domains: list[str] | None = None,
                 vocab_size: int = 8000, text_field: str = "text", workers: int = 2, seed: int = 1,
                 sample_chars: int = 1_000_000, character_coverage: float = 0.9995,
                 overwrite: bool = False, progress: bool | None = None,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | None = None) -> dict:
    """Prepare ``out_dir`` from ``corpus_dir`` and return the manifest (see module docstring):
    ``plan_data``, then every shard in a pool of ``workers`` (``binarize_task`` 0 of 1), then
    ``merge_data``, under one lock.

    ``domains`` selects corpus domains (default: all subdirectories); ``train_domains`` (default:
    ``domains``) train the tokenizer. ``progress`` shows tqdm bars (default: when stderr is a TTY).
    ``tokenizer``: ``hf:PATH`` encodes with that transformers model's tokenizer in the model's
    ids instead of training sentencepiece (``fairseq_ext.encoders``; the sentencepiece settings
    are then unused).
    """
    _check_positive("workers", workers)
    request = _check_request(corpus_dir, domains=domains, train_domains=train_domains, vocab_size=vocab_size,
                             text_field=text_field, seed=seed, sample_chars=sample_chars,
                             character_coverage=character_coverage, overwrite=overwrite, progress=progress,
                             shard_bytes=shard_bytes, tokenizer=tokenizer)
    with _locked(out_dir):
        _plan(Path(out_dir), request, shards.ONE_JOB_PLAN)
        binarize_task(out_dir, 0, 1, workers=workers, progress=request.progress, plan=shards.ONE_JOB_PLAN)
        return _merge(Path(out_dir), shards.ONE_JOB_PLAN)


def plan_data(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, plan: str = shards.PLAN, **kwargs) -> dict:
    """Step 1 (one job): reuse or train the tokenizer, then write ``shards.json``: the shards
    of every (domain, split) whose dataset is not current. Returns the plan's summary."""
    request = _check_request(corpus_dir, **kwargs)
    with _locked(out_dir):
        return _plan(Path(out_dir), request, plan)


def binarize_task(out_dir: str | os.PathLike, task: int, tasks: int, *, workers: int = 1,
                  progress: bool = False, plan: str = shards.PLAN) -> dict:
    """Step 2 (task ``task`` of an array of ``tasks``): binarize this task's shards of the plan
    (``shards.assign_tasks``) that are not done yet. Takes no lock: tasks write disjoint files."""
    out_dir = Path(out_dir)
    if not 0 <= task < tasks:
        raise BtmError(f"shard task {task} is outside the array of {tasks} tasks")
    _check_positive("workers", workers)
    plan_name, plan = plan, shards.read_plan(out_dir, plan)
    manifest = read_data_manifest(out_dir)
    tokenizer_file, sha_key = _tokenizer_file(manifest)
    if sha256_file(out_dir / tokenizer_file) != plan["tokenizer_sha256"]:
        raise BtmError(f"{out_dir / tokenizer_file} changed since {out_dir / plan_name} was written: re-run the plan")
    # The plan dropped the manifest entries of the splits it lists, so an entry from the same
    # source is a merge after this plan (which removed the shards): nothing left to do there.
    merged = manifest["datasets"] if manifest[sha_key] == plan["tokenizer_sha256"] else {}
    mine = [s for s in shards.assign_tasks(plan["shards"], tasks)[task]
            if merged.get(f"{s.domain}/{s.split}", {}).get("source_sha256") != s.source_sha256]
    done = list(binarize.run_shards(out_dir, mine, plan["text_field"], plan["tokenizer_sha256"], workers,
                                    progress))
    return {"shards": len(mine), "binarized": len(done), "bytes": sum(s.size for s in mine),
            "tokens": sum(r["tokens"] for r in done)}


def merge_data(out_dir: str | os.PathLike, plan: str = shards.PLAN) -> dict:
    """Step 3 (one job): concatenate each planned split's shards into ``<domain>/<split>.bin|.idx``,
    record it in the manifest and remove its shards. Returns the manifest."""
    with _locked(out_dir):
        return _merge(Path(out_dir), plan)


@contextlib.contextmanager
def _locked(out_dir):
    import filelock

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(Path(out_dir) / ".prepare.lock"))
    try:
        lock.acquire(timeout=5)
    except filelock.Timeout:
        raise BtmError(f"{out_dir} is being prepared by another process (lock {lock.lock_file})") from None
    try:
        yield
    finally:
        lock.release()


@dataclass(frozen=True)
class _Request:
    """A checked request to prepare data: the source files and the tokenizer settings."""
    sources: dict
    settings: TokenizerSettings
    shard_bytes: int
    overwrite: bool
    progress: bool
    tokenizer: str | None  # hf:PATH, or None: train sentencepiece


def _check_request(corpus_dir, *, domains=None, train_domains=None, vocab_size=8000, text_field="text", seed=1,
                   sample_chars=1_000_000, character_coverage=0.9995, overwrite=False, progress=None,
                   shard_bytes=DEFAULT_SHARD_BYTES, tokenizer=None) -> _Request:
    """Every user error in the arguments or the corpus layout, before anything is written."""
    corpus_dir = Path(corpus_dir)
    available = list_domains(corpus_dir)
    domains = _check_domains(domains or available, available, corpus_dir,
                             "--domains" if domains else f"domain directory of {corpus_dir}")
    train_domains = _check_domains(train_domains or domains, domains, corpus_dir, "--train-domains")
    _check_positive("vocab_size", vocab_size, minimum=N_SPECIAL + 256 + 1)
    _check_positive("sample_chars", sample_chars)
    _check_positive("shard_bytes", shard_bytes)
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
    return _Request(sources, settings, shard_bytes, overwrite, progress, tokenizer)


def _plan(out_dir: Path, request: _Request, plan_name: str) -> dict:
    sources = request.sources
    _remove_stale_temp_files(out_dir)
    source_sha = {key: sha256_file(p) for key, p in sources.items()}
    manifest = _prepare_tokenizer(out_dir, request.settings, sources, source_sha, request.overwrite, request.progress,
                                  request.tokenizer)
    todo = {key: p for key, p in sources.items() if not _split_is_current(out_dir, manifest, *key, source_sha)}
    stale = [f"{d}/{s}" for d, s in todo if f"{d}/{s}" in manifest["datasets"]]
    if stale:  # the manifest only ever lists datasets that are current and complete
        for key in stale:
            del manifest["datasets"][key]
        write_data_manifest(out_dir, manifest)
    planned = shards.plan_shards(todo, source_sha, request.shard_bytes)
    shards.write_plan(out_dir, planned, shard_bytes=request.shard_bytes, text_field=request.settings.text_field,
                      tokenizer_sha256=manifest[_tokenizer_file(manifest)[1]], name=plan_name)
    return {"datasets": len(todo), "shards": len(planned), "bytes": sum(s.size for s in planned)}


def _merge(out_dir: Path, plan_name: str) -> dict:
    plan = shards.read_plan(out_dir, plan_name)
    manifest = read_data_manifest(out_dir)
    groups: dict[tuple[str, str], list] = {}
    for shard in plan["shards"]:
        groups.setdefault((shard.domain, shard.split), []).append(shard)
    ready = {}
    for (domain, split), group in sorted(groups.items()):
        records = [binarize.current_record(out_dir, s, plan["tokenizer_sha256"]) for s in group]
        if all(records):
            if not sum(r["documents"] for r in records):  # checked before any split is merged
                raise BtmError(f"{group[0].source} holds no documents (every line is blank or has an empty "
                               f"{plan['text_field']!r})")
            ready[domain, split] = group
        elif manifest["datasets"].get(f"{domain}/{split}", {}).get("source_sha256") != group[0].source_sha256:
            missing = [s.key for s, r in zip(group, records) if r is None]
            raise BtmError(f"{out_dir}: {len(missing)} shard(s) of {domain}/{split} are not binarized "
                           f"({', '.join(missing[:5])}): run their shard tasks first")
    for (domain, split), group in ready.items():
        manifest["datasets"][f"{domain}/{split}"] = shards.merge_split(out_dir, group)
        # A copy of the shared dictionary next to the splits, so stock fairseq tools
        # (fairseq-train/fairseq-eval-lm DATA/<domain>) read a domain directory as it is.
        atomic_write_bytes(out_dir / domain / "dict.txt", (out_dir / "dict.txt").read_bytes())
        write_data_manifest(out_dir, manifest)
        shards.remove_shards(out_dir, group)
    return manifest


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


def _tokenizer_file(manifest: dict) -> tuple[str, str]:
    """(file name, manifest key of its sha256) of the data's tokenizer."""
    return ((encoders.HF_TOKENIZER, "hf_tokenizer_sha256") if "hf_tokenizer_sha256" in manifest
            else ("spm.model", "spm_model_sha256"))


def _tokenizer_files_match(out_dir: Path, manifest: dict) -> bool:
    try:
        name, key = _tokenizer_file(manifest)
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


def _split_is_current(out_dir: Path, manifest: dict, domain: str, split: str, source_sha: dict) -> bool:
    """Recorded from the same input bytes, and its files still hash as recorded."""
    info = manifest["datasets"].get(f"{domain}/{split}")
    if info is None or info.get("source_sha256") != source_sha[domain, split]:
        return False
    prefix = out_dir / domain / split
    try:
        return (sha256_file(out_dir / domain / "dict.txt") == manifest["dict_sha256"]
                and sha256_file(prefix.with_suffix(".bin")) == info["bin_sha256"]
                and sha256_file(prefix.with_suffix(".idx")) == info["idx_sha256"])
    except OSError:
        return False


def _remove_outputs(out_dir: Path, manifest: dict) -> None:
    """Delete the files a previous prepare wrote (and only those), manifest last."""
    for key in manifest.get("datasets", {}):
        domain, split = key.split("/")
        validate_name(domain, "domain name in manifest")
        for name in (f"{split}.bin", f"{split}.idx", "dict.txt"):
            (out_dir / domain / name).unlink(missing_ok=True)
    for name in ("spm.model", "spm.vocab", encoders.HF_TOKENIZER, "dict.txt", "tokens.csv", shards.PLAN,
                 shards.ONE_JOB_PLAN, MANIFEST):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / shards.SHARD_DIR, ignore_errors=True)


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

