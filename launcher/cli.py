"""The ``btm`` command line: one verb per user task, each defined in ``launcher/commands/``.

Each command module exposes ``register(subparsers)``, which adds its verb(s) and sets
``func`` on the parser to a handler ``(args) -> int``. Command modules import fairseq and
torch only inside their handlers, so ``btm --help``, ``btm status`` and ``btm report`` work
on a login node without them.
"""
from __future__ import annotations

import argparse
import signal
import sys

from launcher.commands import COMMAND_MODULES
from launcher.contract.errors import BtmError
from launcher.contract.logging_setup import quiet_third_party_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="btm",
        description="Branch-Train-Merge: train, merge and evaluate forests of expert LMs on SLURM or locally.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BtmError as e:
        print(f"btm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP under launcher.interrupts
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"btm: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
