"""Register btm's fairseq components (models ``elm`` and ``elm_llama``, task
``multidomain_lm``) for our own code.

fairseq's ``--user-dir fairseq_ext`` imports ``fairseq_ext/models`` and ``fairseq_ext/tasks``
itself. btm's own code (trainer, scoring, averaging) calls ``register_all()`` instead, so that
importing ``fairseq_ext`` stays fairseq-free for the pure-math modules. Registration happens at
import time and Python imports a module once, so calling this twice is harmless.
"""
from __future__ import annotations


def register_all() -> None:
    import fairseq_ext.models  # noqa: F401  (registers models "elm", "elm_llama" and their archs)
    import fairseq_ext.tasks  # noqa: F401  (registers task "multidomain_lm")
