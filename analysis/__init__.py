"""analysis: tables, plots and reports from the results table and job records of btm runs.

- ``analysis.results``: load and validate a run directory (results table, config.yaml,
  records, cached priors).
- ``analysis.tables``: paper-style perplexity tables, cross-run summaries, compute hours;
  Markdown, LaTeX and CSV rendering.
- ``analysis.plots``: matplotlib figures (Agg backend).
- ``analysis.report``: ``build_report(run_dirs, out=None, split=None)``, behind ``btm report``.

Only pandas, numpy, matplotlib and PyYAML; never fairseq or torch. Submodules are imported on
use so ``import analysis`` stays instant.
"""
