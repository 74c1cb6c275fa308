"""Logging settings every btm process shares, whether it started in the CLI or is a worker.

Here (not in ``launcher.cli``) so that ``fairseq_ext`` worker processes can apply them without
importing the launcher's command modules: ``fairseq_ext`` imports only ``launcher.contract``.
"""
from __future__ import annotations

import logging


def quiet_third_party_logging() -> None:
    """fairseq's import runs ``logging.basicConfig(level=DEBUG)`` (fairseq/tasks/text_to_speech.py),
    after which every filelock acquire/release and an INFO notice reach the user's terminal;
    those loggers are set to WARNING so a verb's output stays ours. Call it before importing
    fairseq in any process (the CLI does at start; data-prep workers do when they start).
    Imports no fairseq itself."""
    for name in ("filelock", "fairseq.tasks.text_to_speech"):
        logging.getLogger(name).setLevel(logging.WARNING)
