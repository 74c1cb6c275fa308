"""btm verbs: seed branch train. (Being built: seed, branch and expert training.)"""
from launcher.errors import BtmError


def _not_ready(args):
    raise BtmError(f"'btm {args.command}' is not implemented yet")


def register(subparsers):
    subparsers.add_parser("seed", help="(not implemented yet)").set_defaults(func=_not_ready)
    subparsers.add_parser("branch", help="(not implemented yet)").set_defaults(func=_not_ready)
    subparsers.add_parser("train", help="(not implemented yet)").set_defaults(func=_not_ready)
