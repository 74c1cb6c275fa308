"""Reading YAML a user wrote (configs, ``--set`` values, cluster profiles), bounded.

YAML aliases let a few hundred bytes stand for billions of values ("billion laughs"): the
parser shares one object per anchor, but everything that walks the result (validation, hashing,
an error message echoing a value) expands it. So the document is composed first and its
*expanded* size counted on the node graph (each anchor counted once, memoized: linear in the
file) before anything is built from it. Recursive aliases and nesting deeper than Python's
stack are refused too. No btm file comes anywhere near the bound.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from launcher.contract.errors import BtmError

MAX_YAML_NODES = 100_000  # expanded scalars + collections; the largest shipped config has < 200


def read_user_text(path: Path, what: str) -> str:
    """The text of a YAML file the user named; ``what`` says which (``"config"``, ...) in the error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BtmError(f"cannot read {what} {path}: {e}") from None


def read_user_yaml(path: Path, what: str):
    """A user's YAML file, read and parsed within the bound (``load_bounded``)."""
    return load_bounded(read_user_text(path, what), str(path))[0]


def load_bounded(text: str, source: str):
    """``(yaml.safe_load(text), its node graph)``, refused if the document expands past the bound."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _expanded_size(node, source, {}, set())
        return yaml.safe_load(text), node
    except yaml.YAMLError as e:
        raise BtmError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise BtmError(f"{source}: YAML nested too deeply") from None


def _expanded_size(node, source: str, memo: dict, active: set) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise BtmError(f"{source}:{node.start_mark.line + 1}: a YAML alias refers to its own anchor "
                       "(a recursive structure is never a valid value)")
    active.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, source, memo, active)
        if total > MAX_YAML_NODES:
            raise BtmError(f"{source}: the YAML expands to more than {MAX_YAML_NODES} values (aliases of "
                           "aliases, a 'billion laughs'?); a btm config is a few hundred")
    active.discard(key)
    memo[key] = total
    return total
