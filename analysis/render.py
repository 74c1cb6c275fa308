"""A table as text: Markdown, LaTeX and CSV, each able to mark the best value of a row (the
lowest, or the highest where a metric is better high)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

MEAN_ROW = "mean"  # the summary row of a table (rendered below a rule, like "total")


def best_mask(table: pd.DataFrame, higher: pd.Series | None = None, digits: int = 2) -> pd.DataFrame:
    """True where a value is the best of its row as displayed (``digits`` decimals; ties all):
    the lowest, or the highest for rows where ``higher`` (indexed like the table) is True."""
    rounded = table.round(digits)
    best = rounded.min(axis=1)
    if higher is not None:
        up = higher.reindex(table.index).fillna(False).astype(bool)
        best = best.where(~up, rounded.max(axis=1))
    return rounded.eq(best, axis=0) & table.notna()


def _fmt(value, digits: int = 2) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.{digits}f}"


def to_markdown(table: pd.DataFrame, mark_best: bool = True, digits: int = 2,
                higher: pd.Series | None = None) -> str:
    """A GitHub Markdown table; the row's best value in **bold**, missing values as –."""
    best = best_mask(table.select_dtypes("number"), higher, digits) if mark_best else None
    header = [table.index.name or ""] + [str(c) for c in table.columns]
    numeric = set(table.select_dtypes("number").columns)
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|---|" + "".join("---:|" if c in numeric else "---|" for c in table.columns)]
    for idx, row in table.iterrows():
        cells = [_md_escape(str(idx))]
        for col, value in row.items():
            text = _md_escape(_fmt(value, digits))
            if best is not None and col in best.columns and bool(best.at[idx, col]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, caption: str = "", mark_best: bool = True,
             digits: int = 2, higher: pd.Series | None = None) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); best value in \\textbf.

    A row named ``mean`` or ``total`` is set off by a ``\\midrule`` as in the paper's tables.
    """
    best = best_mask(table.select_dtypes("number"), higher, digits) if mark_best else None
    numeric = set(table.select_dtypes("number").columns)
    spec = "l" + "".join("r" if c in numeric else "l" for c in table.columns)
    lines = []
    if caption:
        lines.append(f"% {caption}")
    lines += ["% requires \\usepackage{booktabs}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
              " & ".join(latex_escape(h) for h in [table.index.name or ""] + list(table.columns))
              + " \\\\", "\\midrule"]
    for idx, row in table.iterrows():
        if str(idx) in (MEAN_ROW, "total"):
            lines.append("\\midrule")
        cells = [latex_escape(idx)]
        for col, value in row.items():
            text = latex_escape(_fmt(value, digits)).replace("–", "--")
            if best is not None and col in best.columns and bool(best.at[idx, col]):
                text = f"\\textbf{{{text}}}"
            cells.append(text)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame, mark_best: bool = True, higher: pd.Series | None = None,
           digits: int = 2) -> str:
    """CSV of the table; with mark_best, a last column ``best`` names each row's best column(s)."""
    out = table.copy()
    if mark_best:
        best = best_mask(table.select_dtypes("number"), higher, digits)
        out["best"] = [";".join(str(c) for c in best.columns if best.at[i, c]) for i in best.index]
    return out.to_csv()
