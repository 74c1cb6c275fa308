"""The one exception type users see.

Anything raised as ``BtmError`` is a problem with the user's input or environment; the CLI
prints its message (which must name the file, field or value at fault) and exits with status 2.
Any other exception is a bug and keeps its traceback.
"""


class BtmError(Exception):
    """A user-facing error whose message names the culprit (file, key, value)."""


# Exit status of a stage command that saved its state on SIGUSR2/SIGTERM and wants to be
# requeued; executors treat it as "not finished, not failed".
PREEMPTED_EXIT = 3
