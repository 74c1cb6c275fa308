"""SIGTERM and SIGHUP end ``btm run`` the way Ctrl-C does.

By default they kill the Python process at once: no ``finally`` runs, so the local executor
never stops the stage processes it started (each in its own session, so the signal does not
reach them) and they run on as orphans. Inside ``ends_like_ctrl_c`` all three raise
``Interrupted`` (a ``KeyboardInterrupt``): the executor's cleanup sends each running unit
SIGTERM (a trainer saves its state and exits 3) and waits for it, and the CLI exits
128 + the signal number (130, 143, 129). Once the first signal arrived, further ones are
ignored until the command ends, so a second Ctrl-C cannot cut the cleanup short and orphan
the units that were still stopping; SIGKILL remains for a user who will not wait.
"""
from __future__ import annotations

import functools
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def ends_like_ctrl_c(command):
    """Decorate a CLI handler: SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` while it runs."""
    @functools.wraps(command)
    def wrapped(*args, **kwargs):
        old = {sig: signal.signal(sig, _interrupt) for sig in SIGNALS}
        try:
            return command(*args, **kwargs)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    return wrapped
