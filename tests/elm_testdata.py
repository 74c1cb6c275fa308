"""Build a tiny DATA dir in the `btm data prepare` layout with fairseq's own writers.

Until `fairseq_ext.data_prep.prepare_data` is on main this stands in for it in the model-side
tests: characters are the tokens (no sentencepiece), but the files are the real thing
(DATA/dict.txt, DATA/<domain>/<split>.bin|.idx via fairseq's MMapIndexedDatasetBuilder, one
item per document ending in eos).
"""
from __future__ import annotations

import json
from pathlib import Path


def build_char_data(corpus: Path, out: Path, domains: list[str],
                    splits=("train", "valid", "test")) -> Path:
    import torch
    from fairseq.data import Dictionary
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_int_dtype

    if (out / "dict.txt").exists():
        return out
    docs = {}
    for d in domains:
        for s in splits:
            path = corpus / d / f"{s}.jsonl"
            docs[d, s] = [json.loads(line)["text"] for line in path.read_text().splitlines()
                          if line.strip()]
    dictionary = Dictionary()
    for d in domains:
        for text in docs[d, "train"]:
            for ch in text:
                dictionary.add_symbol(ch if not ch.isspace() else f"<{ord(ch)}>")
    dictionary.finalize(threshold=0, nwords=-1, padding_factor=8)
    out.mkdir(parents=True, exist_ok=True)
    dictionary.save(str(out / "dict.txt"))
    for (d, s), texts in docs.items():
        (out / d).mkdir(exist_ok=True)
        prefix = out / d / s
        builder = MMapIndexedDatasetBuilder(str(prefix) + ".bin",
                                            dtype=best_fitting_int_dtype(len(dictionary)))
        for text in texts:
            ids = [dictionary.index(ch if not ch.isspace() else f"<{ord(ch)}>") for ch in text]
            builder.add_item(torch.tensor(ids + [dictionary.eos()], dtype=torch.int64))
        builder.finalize(str(prefix) + ".idx")
    return out
