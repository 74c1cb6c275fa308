"""A Hugging Face fast tokenizer that gives the same ids as btm's sentencepiece + fairseq pipeline.

btm tokenizes with one sentencepiece BPE model per data dir (``spm.model``: byte fallback,
identity normalization, no dummy prefix, spaces kept) whose piece ids *are* the fairseq
dictionary ids (``fairseq_ext/spm_tokenizer.py``). The equivalent ``tokenizers`` pipeline:

- normalizer: ``" "`` -> ``"▁"`` (sentencepiece's only normalization with the identity rule and
  ``remove_extra_whitespaces=False``; tabs, newlines and other spaces are left alone);
- no pre-tokenizer: sentencepiece's BPE merges over the whole string, not over words;
- model: BPE over the sentencepiece pieces with their ids, ``byte_fallback=True`` (a character
  without its own piece becomes its UTF-8 byte pieces ``<0xNN>``, exactly like sentencepiece);
  the merges are every split ``left + right`` of a normal piece into two normal pieces, ranked
  by the merged piece's sentencepiece score (sentencepiece merges the adjacent pair whose
  concatenation has the highest score, leftmost first; byte and control pieces are never
  merge results);
- decoder: ``"▁"`` -> ``" "``, byte pieces -> bytes -> text.

Special tokens ``<s> <pad> </s> <unk>`` are ids 0-3 as in fairseq. They are registered as
special but *not* parsed out of text (``split_special_tokens``), because sentencepiece encodes
a literal ``"</s>"`` in a document as characters. ``bos_token`` is ``</s>``: btm models see
``</s>`` (eos, id 2) in front of every document, never ``<s>`` (GPT-2's convention, too).

One input class differs, by construction of btm's pipeline: a *literal* U+2581 ``▁`` in the text.
``data_prep.encode_text`` writes it as its three byte pieces (so that it decodes back to ``▁``,
not to a space), while any single-string tokenizer whose space marker is ``▁`` must treat it
like a space; no serializable ``tokenizers`` component can tell the two apart (see
docs/export.md). :func:`has_space_mark` lets callers detect such text.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from launcher.contract.errors import BtmError

from fairseq_ext.spm_tokenizer import SPACE_MARK
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq ids 0, 1, 2, 3


def has_space_mark(text: str) -> bool:
    """True when ``text`` holds a literal ``▁``, the one character the exported tokenizer
    encodes differently from ``data_prep.encode_text`` (as a space instead of byte pieces)."""
    return SPACE_MARK in text


def _spm_pieces(spm_model: str | os.PathLike):
    """[(piece, score, kind)] in id order; kind is 'normal', 'byte', 'control' or 'unknown'."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    pieces = []
    for i in range(sp.get_piece_size()):
        if sp.is_byte(i):
            kind = "byte"
        elif sp.is_control(i):
            kind = "control"
        elif sp.is_unknown(i):
            kind = "unknown"
        elif sp.is_unused(i):
            kind = "unused"
        else:
            kind = "normal"
        pieces.append((sp.id_to_piece(i), sp.get_score(i), kind))
    return pieces


def check_dictionary(pieces, symbols: list[str], where: str) -> None:
    """The fairseq dictionary must list exactly the sentencepiece pieces in id order."""
    if len(symbols) != len(pieces):
        raise BtmError(f"{where}: the dictionary has {len(symbols)} symbols but spm.model has "
                       f"{len(pieces)} pieces; the model was not trained on this data dir's tokenizer")
    for i, (sym, (piece, _, kind)) in enumerate(zip(symbols, pieces)):
        if i >= len(SPECIAL_TOKENS) and sym != piece:
            raise BtmError(f"{where}: dictionary symbol {i} is {sym!r} but spm piece {i} is {piece!r}; "
                           "the model was not trained on this data dir's tokenizer")


def bpe_merges(pieces) -> list[tuple[str, str]]:
    """Every way to build a normal piece from two normal pieces, best merged piece first."""
    normal = {p: (score, i) for i, (p, score, kind) in enumerate(pieces) if kind == "normal"}
    merges = []
    for piece, (score, pid) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append(((-score, pid, normal[left][1], normal[right][1]), left, right))
    merges.sort()
    return [(left, right) for _, left, right in merges]


def build_tokenizer(spm_model: str | os.PathLike, symbols: list[str] | None = None):
    """A ``tokenizers.Tokenizer`` equal to ``data_prep.encode_text`` (see the module docstring).

    ``symbols``: the fairseq dictionary's symbols, checked against the pieces (None: unchecked).
    """
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    pieces = _spm_pieces(spm_model)
    if symbols is not None:
        check_dictionary(pieces, symbols, str(spm_model))
    if [p for p, _, _ in pieces[:4]] != list(SPECIAL_TOKENS):
        raise BtmError(f"{spm_model}: pieces 0-3 are {[p for p, _, _ in pieces[:4]]}, expected "
                       f"{list(SPECIAL_TOKENS)} (fairseq's bos, pad, eos, unk)")
    missing = [f"<0x{b:02X}>" for b in range(256) if pieces_index(pieces).get(f"<0x{b:02X}>") is None]
    if missing:
        raise BtmError(f"{spm_model} was trained without byte fallback (no piece {missing[0]}); "
                       "btm's data prepare always enables it")
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    tok = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(pieces), unk_token="<unk>",
                        fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE_MARK)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    return tok


def pieces_index(pieces) -> dict[str, int]:
    return {p: i for i, (p, _, _) in enumerate(pieces)}


def save_pretrained_tokenizer(spm_model: str | os.PathLike, symbols: list[str] | None,
                              out_dir: str | os.PathLike, model_max_length: int) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``
    (a staging directory; the caller renames it into place). Returns the written paths."""
    from fairseq_ext.hf_compat import hide_broken_torchaudio

    hide_broken_torchaudio()
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(spm_model, symbols),
        bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<s>"], split_special_tokens=True,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    files = fast.save_pretrained(str(out_dir), legacy_format=False)
    return [Path(f) for f in files]


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
