"""The encoder of a prepared data directory: text -> the token ids its datasets hold, and back.

Two kinds, told apart by the files in ``DATA/``:

- **sentencepiece** (the default, ``spm.model``): trained by btm (``fairseq_ext.spm_tokenizer``);
  its ids are fairseq's (bos=0, pad=1, eos=2, unk=3); a document is its ids then eos.
- **hf** (``tokenizer.json``, a copy of ``corpus.tokenizer: hf:PATH``): a transformers
  model's own fast tokenizer (the ``tokenizers`` library). Every id is the model's own id, so
  an imported model's embedding row i is the data's token i. ``dict.txt`` lists ids 4.. in
  the model's order (ids 0-3 are fairseq's four placeholder names, whatever the model calls
  them; symbols are names only, ids are what the model sees); rows of the model's embedding
  without a token are ``<hf:ID>``. The fairseq roles follow the model: eos is its eos token
  (the document separator), bos its bos when its tokenizer puts one in front of a text, pad
  the tokenizer's pad token, else its lowest-id other special token btm never writes into the
  data, else -- GPT-2's only ``<|endoftext|>`` -- eos itself. Pad only fills padded inputs:
  padded targets are ``streams.IGNORED_TARGET`` and the scorers mask by position, so no path
  tells padding by its id. Special tokens are never parsed out of a document's text; an
  encoding that still yields the pad id is an error. The roles
  are recorded in the manifest (``settings.special_ids``) and in every checkpoint's
  dictionary (``fairseq_ext.checkpoint``).

``data_encoder(DATA)`` is the one place that picks between them; data prep, scoring, the
lm-eval model and export read through it (docs/data.md).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from launcher.contract.atomic import atomic_path, atomic_write_text, sha256_file
from launcher.contract.data_manifest import MANIFEST, read_data_manifest
from launcher.contract.errors import BtmError
from launcher.contract.hf_model import hf_dir, hf_tokenizer_files, hf_tokenizer_size

HF_TOKENIZER = "tokenizer.json"  # DATA/tokenizer.json: the copy of the model's tokenizer
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3 of every fairseq Dictionary


@dataclass(frozen=True)
class Encoder:
    kind: str  # "sentencepiece" | "hf"
    encode: Callable[[str], list[int]]  # a text's ids, no separators
    decode: Callable[[list[int]], str]  # ids (separators already removed) -> text
    special_ids: dict  # {"bos", "pad", "eos", "unk"} roles; bos None: not written
    size: int  # ids of the dictionary (= rows of the model's embedding)
    tokenizer_file: Path  # spm.model or tokenizer.json

    @property
    def eos(self) -> int:
        return self.special_ids["eos"]

    @property
    def pad(self) -> int:
        return self.special_ids["pad"]

    def document(self, text: str) -> list[int]:
        """A dataset item: [bos] + ids + [eos] (bos only for models whose tokenizer adds one)."""
        return [i for part in self.document_parts(text) for i in part]

    def document_parts(self, text: str):
        """A dataset item in consecutive parts, so a huge document is never held as one list of
        ids: [bos], the ids of each piece of the text, [eos]. Sentencepiece data encodes the text
        in pieces cut where no piece of its tokenizer spans the cut (``text_chunks``: the same
        ids as one call). An hf tokenizer encodes the document in one call: its pre-tokenizer
        (a prepended ``▁``, byte-level rules) gives no such guarantee."""
        from fairseq_ext.spm_tokenizer import text_chunks

        bos = self.special_ids.get("bos_per_document")
        if bos is not None:
            yield [bos]
        for piece in (text_chunks(text) if self.kind == "sentencepiece" else [text]):
            ids = self.encode(piece)
            if self.pad in ids:
                raise BtmError(f"{self.tokenizer_file} encodes a document to id {self.pad}, the id btm "
                               f"pads with (a token it should never produce; text starts {text[:60]!r})")
            yield ids
        yield [self.eos]

    def strip(self, ids) -> list[int]:
        """Ids without bos, eos and pad (what decodes to a document's text)."""
        drop = {self.eos, self.pad, self.special_ids["bos"]}
        return [int(i) for i in ids if int(i) not in drop]


def is_hf_data(data_dir: str | os.PathLike) -> bool:
    return (Path(data_dir) / HF_TOKENIZER).is_file()


def data_encoder(data_dir: str | os.PathLike) -> Encoder:
    """The encoder of a prepared data directory (see the module docstring)."""
    data_dir = Path(data_dir).resolve()
    if not is_hf_data(data_dir):
        from fairseq_ext import spm_tokenizer as spm

        tok = spm._load_tokenizer(data_dir)
        ids = {"bos": spm.BOS_ID, "pad": spm.PAD_ID, "eos": spm.EOS_ID, "unk": spm.UNK_ID}
        return Encoder("sentencepiece", lambda text: spm.encode_with(tok.sp, text), tok.sp.decode,
                       ids, tok.size, data_dir / "spm.model")
    path = data_dir / HF_TOKENIZER
    return _hf_encoder(str(data_dir), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _hf_encoder(data_dir: str, _mtime: int) -> Encoder:
    path = Path(data_dir) / HF_TOKENIZER
    tok = _load_hf_tokenizer(path)
    try:
        settings = read_data_manifest(data_dir)["settings"]
        ids, size = settings["special_ids"], int(settings["vocab_rows"])
    except (KeyError, TypeError, ValueError) as e:
        raise BtmError(f"{Path(data_dir) / MANIFEST} does not record the special ids of "
                       f"{path} ({e!r}); prepare the data again") from None

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return Encoder("hf", encode, lambda ids: tok.decode(ids, skip_special_tokens=False), ids, size, path)


def _load_hf_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises bare Exceptions for unreadable files
        raise BtmError(f"cannot load the tokenizer {path}: {e}") from None
    tok.encode_special_tokens = True  # "</s>" in a document is text, as with sentencepiece
    tok.no_truncation()
    tok.no_padding()
    return tok


def encode_text(data_dir: str | os.PathLike, text: str) -> list[int]:
    """The token ids of ``text`` in a data directory's encoder, without separators."""
    return data_encoder(data_dir).encode(text)


def decode_ids(data_dir: str | os.PathLike, ids) -> str:
    """The text of token ids; bos/pad/eos are dropped, so a dataset item decodes to its document."""
    encoder = data_encoder(data_dir)
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < encoder.size]
    if bad:
        raise BtmError(f"token id {bad[0]} is outside the vocabulary of {data_dir} (size {encoder.size})")
    return encoder.decode(encoder.strip(ids))


def load_dictionary(data_dir: str | os.PathLike):
    """The fairseq Dictionary of a data directory with its special roles (eos, pad, ...)."""
    from fairseq.data import Dictionary

    path = Path(data_dir) / "dict.txt"
    if not path.is_file():
        raise BtmError(f"{data_dir} has no dict.txt: run 'btm data prepare' first")
    dictionary = Dictionary.load(str(path))
    if is_hf_data(data_dir):
        set_special_ids(dictionary, data_encoder(data_dir).special_ids)
    return dictionary


def set_special_ids(dictionary, ids: dict) -> None:
    dictionary.bos_index, dictionary.pad_index = ids["bos"], ids["pad"]
    dictionary.eos_index, dictionary.unk_index = ids["eos"], ids["unk"]


def special_ids_of(dictionary) -> dict:
    return {"bos": dictionary.bos_index, "pad": dictionary.pad_index,
            "eos": dictionary.eos_index, "unk": dictionary.unk_index}


def export_special_ids(encoder: Encoder) -> dict:
    """The ids an exported model's config.json and generation_config.json name: what btm puts
    in front of a document (eos for sentencepiece data; the model's bos when it has one)."""
    first = encoder.special_ids.get("bos_per_document")
    return {"bos_token_id": encoder.eos if first is None else first,
            "eos_token_id": encoder.eos, "pad_token_id": encoder.pad}


def save_pretrained_hf_tokenizer(data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                                 model_max_length: int) -> list[Path]:
    """The data's hf tokenizer as transformers files in ``out_dir`` (an export's staging dir)."""
    from fairseq_ext.hf_compat import hide_broken_torchaudio

    hide_broken_torchaudio()
    from transformers import PreTrainedTokenizerFast

    encoder = data_encoder(data_dir)
    tok = _load_hf_tokenizer(encoder.tokenizer_file)
    ids = export_special_ids(encoder)
    names = {role: tok.id_to_token(ids[f"{role}_token_id"]) for role in ("bos", "eos", "pad")}
    fast = PreTrainedTokenizerFast(tokenizer_file=str(encoder.tokenizer_file),
                                   unk_token=tok.id_to_token(encoder.special_ids["unk"]),
                                   bos_token=names["bos"], eos_token=names["eos"],
                                   pad_token=names["pad"], model_max_length=model_max_length)
    files = [Path(f) for f in fast.save_pretrained(str(out_dir))]
    # As the data: a special token's text in a document is text. transformers 5 does not save
    # split_special_tokens itself, but reads it back from tokenizer_config.json.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    atomic_write_text(config_path, json.dumps(config | {"split_special_tokens": True}, indent=2) + "\n")
    return files


# ---- preparing DATA/ from a transformers tokenizer ------------------------------------------

def hf_tokenizer_key(tokenizer: str) -> dict:
    """What an hf tokenizer's data depends on (the manifest's ``tokenizer``; a change is
    refused): the bytes of the files it is read from, wherever the directory is."""
    source = hf_dir(tokenizer)
    if not (source / HF_TOKENIZER).is_file():
        raise BtmError(f"{source} has no {HF_TOKENIZER} (a fast tokenizer of the `tokenizers` "
                       "library); save the tokenizer with save_pretrained")
    return {"kind": "hf", "files_sha256": {p.name: sha256_file(p) for p in hf_tokenizer_files(source)}}


def prepare_hf_tokenizer(out_dir: Path, tokenizer: str) -> dict:
    """Copy the tokenizer into ``out_dir``, write dict.txt; returns the manifest's fields."""
    source = hf_dir(tokenizer)
    tok = _load_hf_tokenizer(source / HF_TOKENIZER)
    size = hf_tokenizer_size(source)
    rows = _embedding_rows(source, size)
    ids = _special_ids(tok, source)
    symbols, seen = [], set(FAIRSEQ_SPECIALS)
    for i in range(len(FAIRSEQ_SPECIALS), rows):
        token = tok.id_to_token(i) if i < size else None
        safe = token and not any(c.isspace() for c in token) and token not in seen
        symbols.append(token if safe else f"<hf:{i}>")
        seen.add(symbols[-1])
    with atomic_path(out_dir / HF_TOKENIZER) as tmp:
        shutil.copyfile(source / HF_TOKENIZER, tmp)
    atomic_write_text(out_dir / "dict.txt", "".join(f"{s} 1\n" for s in symbols))
    return {"vocab_size": rows, "hf_tokenizer_sha256": sha256_file(out_dir / HF_TOKENIZER),
            "special_ids": ids}


def _embedding_rows(source: Path, size: int) -> int:
    """The model's embedding rows (its config.json vocab_size), else the tokenizer's size."""
    config = source / "config.json"
    if not config.is_file():
        return size
    try:
        rows = int(json.loads(config.read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BtmError(f"cannot read vocab_size from {config}: {e!r}") from None
    if size > rows:
        raise BtmError(f"{source}/{HF_TOKENIZER} has {size} ids but the model's embedding "
                       f"({config} vocab_size) has only {rows} rows")
    return rows


def _special_token(source: Path, role: str) -> str | None:
    """The ``role`` token (``eos_token``...) of tokenizer_config.json/special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = source / name
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get(role)
            except (OSError, ValueError) as e:
                raise BtmError(f"cannot read {path}: {e}") from None
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return None


def _special_ids(tok, source: Path) -> dict:
    """The fairseq roles in the model's ids (see the module docstring)."""
    def token_id(role: str) -> int | None:
        token = _special_token(source, role)
        if token is not None and tok.token_to_id(token) is None:
            raise BtmError(f"{source}: {role} {token!r} is not in {HF_TOKENIZER}")
        return None if token is None else tok.token_to_id(token)

    eos = token_id("eos_token")
    if eos is None:
        raise BtmError(f"{source}: the tokenizer has no eos token (tokenizer_config.json "
                       "eos_token); btm separates documents with it")
    with_bos = tok.encode("a", add_special_tokens=True).ids
    plain = tok.encode("a", add_special_tokens=False).ids
    bos = with_bos[0] if with_bos[1:len(plain) + 1] == plain and len(with_bos) > len(plain) else None
    written = {eos, bos}
    candidates = [token_id("pad_token")] + sorted(i for i, t in tok.get_added_tokens_decoder().items()
                                                  if t.special)
    spare = next((i for i in candidates if i is not None and i not in written), None)
    # GPT-2's convention (only <|endoftext|>): pad with eos, as transformers users do. Safe
    # because padding is told by position (IGNORED_TARGET, scoring's block lengths), never by id.
    pad = eos if spare is None else spare
    unk = token_id("unk_token")
    return {"bos": bos if bos is not None else eos, "pad": pad, "eos": eos,
            "unk": unk if unk is not None else pad, "bos_per_document": bos}
