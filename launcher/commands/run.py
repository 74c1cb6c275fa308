"""btm verbs: run status cancel stage. (Being built: pipeline.)"""
from launcher.errors import BtmError


def _not_ready(args):
    raise BtmError(f"'btm {args.command}' is not implemented yet")


def register(subparsers):
    subparsers.add_parser("run", help="(not implemented yet)").set_defaults(func=_not_ready)
    subparsers.add_parser("status", help="(not implemented yet)").set_defaults(func=_not_ready)
    subparsers.add_parser("cancel", help="(not implemented yet)").set_defaults(func=_not_ready)
    subparsers.add_parser("stage", help="(not implemented yet)").set_defaults(func=_not_ready)
