"""btm verbs: forest. (Being built: forest manifest.)"""
from launcher.errors import BtmError


def _not_ready(args):
    raise BtmError(f"'btm {args.command}' is not implemented yet")


def register(subparsers):
    subparsers.add_parser("forest", help="(not implemented yet)").set_defaults(func=_not_ready)
