"""Local data for the btm harness test tasks, built from the development corpus at run time.

The corpus is never copied into the repository: ``--metadata '{"corpus": "DIR"}'`` (or
``simple_evaluate(metadata=...)``) names it; the default is ``$BTM_SHARED/corpus``.

``load_domain_id``: every task document shows 8 labelled passages, one per corpus domain, and
asks for the domain of a ninth passage (the next passage of one domain's valid split).
``load_domain_fewshot``: labelled passages to draw demonstrations from (``train``) and query
passages (``test``); lm_eval's few-shot sampler builds the prompt.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

PASSAGE_CHARS = 60


def _passages(corpus: Path, domain: str, n: int) -> list[str]:
    out = []
    with gzip.open(corpus / domain / "valid.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            text = " ".join(json.loads(line)["text"].split())[:PASSAGE_CHARS]
            if text:
                out.append(text)
            if len(out) == n:
                break
    return out


def load_domain_id(corpus: str | None = None, queries_per_domain: int = 1, **_unused):
    import datasets

    corpus = Path(corpus or Path(os.environ.get("BTM_SHARED", "../shared")) / "corpus")
    domains = sorted(p.name for p in corpus.iterdir() if p.is_dir())
    passages = {d: _passages(corpus, d, 1 + int(queries_per_domain)) for d in domains}
    shots = "".join(f"Passage: {passages[d][0]}\nDomain: {d}\n\n" for d in domains)
    rows = []
    for d in domains:
        for query in passages[d][1:]:
            rows.append({"prompt": f"{shots}Passage: {query}\nDomain:", "passage": query,
                         "domain": d, "choices": domains, "label": domains.index(d)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_domain_fewshot(corpus: str | None = None, shots_per_domain: int = 3, queries_per_domain: int = 1,
                        **_unused):
    import datasets

    corpus = Path(corpus or Path(os.environ.get("BTM_SHARED", "../shared")) / "corpus")
    domains = sorted(p.name for p in corpus.iterdir() if p.is_dir())
    n = int(shots_per_domain)
    split = {"train": [], "test": []}
    for d in domains:
        texts = _passages(corpus, d, n + int(queries_per_domain))
        for name, part in (("train", texts[:n]), ("test", texts[n:])):
            split[name] += [{"passage": t, "domain": d, "choices": domains, "label": domains.index(d)}
                            for t in part]
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in split.items()})
