"""Names of domains, experts, runs and clusters.

A name becomes a directory, part of a SLURM job name and an argument on a command line, so it
is restricted to a safe alphabet instead of being escaped everywhere it travels.
"""
from __future__ import annotations

import re
import reprlib

from launcher.contract.errors import BtmError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a safe identifier, else raise BtmError naming it.

    Allowed: letters, digits, ``_``, ``-`` and ``.``, starting with a letter or digit, at most
    100 characters, and never ``..`` (so no path traversal).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        # reprlib keeps a pasted megabyte from being echoed whole.
        raise BtmError(
            f"invalid {what} {reprlib.repr(name)}: use letters, digits, '_', '-' and '.', starting with a "
            "letter or digit (no '/', '..', spaces, newlines or shell characters)"
        )
    return name
