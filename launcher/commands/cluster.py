"""btm verbs: cluster. (Being built: c-BTM clustering.)"""
from launcher.errors import BtmError


def _not_ready(args):
    raise BtmError(f"'btm {args.command}' is not implemented yet")


def register(subparsers):
    subparsers.add_parser("cluster", help="(not implemented yet)").set_defaults(func=_not_ready)
