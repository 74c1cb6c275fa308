"""The one exception type users see.

Anything raised as ``BtmError`` is a problem with the user's input or environment; the CLI
prints its message (which must name the file, field or value at fault) and exits with status 2.
Any other exception is a bug and keeps its traceback.
"""
import reprlib


class BtmError(Exception):
    """A user-facing error whose message names the culprit (file, key, value)."""


SHOWN_CHARS = 200
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxtuple = 8


def shown(value) -> str:
    """``repr(value)`` cut to a short line, for echoing a user's value in a message: a pasted
    megabyte or an alias-expanded YAML tree is never printed whole."""
    text = _SHOWN.repr(value)  # each string and list is cut, but nested lists multiply
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}..."


# Exit status of a stage command that saved its state on SIGUSR2/SIGTERM and wants to be
# requeued; executors treat it as "not finished, not failed".
PREEMPTED_EXIT = 3
