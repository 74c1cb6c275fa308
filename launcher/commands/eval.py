"""btm verbs: eval average. (Being built: forest evaluation and parameter averaging.)"""
from launcher.errors import BtmError


def _not_ready(args):
    raise BtmError(f"'btm {args.command}' is not implemented yet")


def register(subparsers):
    subparsers.add_parser("eval", help="(not implemented yet)").set_defaults(func=_not_ready)
    subparsers.add_parser("average", help="(not implemented yet)").set_defaults(func=_not_ready)
