"""``RUN/results/ablation.csv``: the expert-removal table of ``btm forest ablate`` (one writer,
one reader; the rows come from fairseq_ext/ablation.py, the report reads them in analysis/).

One row per (removed expert, eval domain): the forest's perplexity on that domain with all its
experts (``*_full``) and without the removed one (``*_without``), the prior re-estimated over
the remaining experts, and ``rel_ppl_change = ppl_without / ppl_full - 1``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from launcher.contract.atomic import atomic_write_text
from launcher.contract.errors import BtmError

ABLATION_COLUMNS = ("removed", "eval_domain", "split", "method", "prior", "temperature_full",
                    "temperature_without", "experts_left", "nll_full", "nll_without", "ppl_full",
                    "ppl_without", "rel_ppl_change")
_TEXT = ("removed", "eval_domain", "split", "method", "prior")


def write_ablation(path: str | os.PathLike, rows: list[dict]) -> pd.DataFrame:
    """Write the table atomically (replacing any older one: it describes the forest as it is)."""
    table = pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))
    atomic_write_text(path, table.to_csv(index=False, float_format="%.10g"))
    return table


def read_ablation(path: str | os.PathLike) -> pd.DataFrame | None:
    """The table at ``path`` (None when there is none); a damaged one is a BtmError naming the
    file and the column, with the command that rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return None
    fix = f"run `btm forest ablate {path.parent.parent}` to rebuild it"
    try:
        table = pd.read_csv(path, dtype={c: str for c in _TEXT}, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise BtmError(f"cannot read {path}: {e}; {fix}") from None
    missing = [c for c in ABLATION_COLUMNS if c not in table.columns]
    if missing:
        raise BtmError(f"{path} lacks column(s) {', '.join(missing)}; {fix}")
    for c in ABLATION_COLUMNS:
        if c not in _TEXT:
            table[c] = pd.to_numeric(table[c], errors="coerce")
            if table[c].isna().any():
                raise BtmError(f"{path}: column {c} has a missing or non-numeric value; {fix}")
    return table
