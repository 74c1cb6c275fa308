"""Importing ``transformers`` next to fairseq's torchaudio dependency.

fairseq requires ``torchaudio``; when the installed torchaudio binary does not match torch (a
CUDA build next to a CPU torch, or a torch newer than any torchaudio wheel), ``import
torchaudio`` fails with ``OSError`` and ``transformers`` (which imports it whenever it is
installed) fails with it, although btm never uses audio. :func:`import_transformers` treats a
torchaudio that cannot load as absent (``sys.modules["torchaudio"] = None``, which makes
``importlib.util.find_spec`` report it missing) and then imports transformers. A working
torchaudio is left alone.
"""
from __future__ import annotations

import sys


def hide_broken_torchaudio() -> bool:
    """Mark torchaudio as not installed when it cannot be imported; True if it was hidden."""
    if "torchaudio" in sys.modules:
        return sys.modules["torchaudio"] is None
    import importlib.util

    if importlib.util.find_spec("torchaudio") is None:
        return False
    try:
        import torchaudio  # noqa: F401
        return False
    except (OSError, ImportError, RuntimeError):
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        sys.modules["torchaudio"] = None
        return True


def import_transformers():
    """``import transformers`` (after :func:`hide_broken_torchaudio`)."""
    hide_broken_torchaudio()
    import transformers

    return transformers
