"""The ``btm`` verbs, one module per group. Order here is the order in ``btm --help``."""
from launcher.commands import data, train, eval as eval_, cluster, run, forest, report, export, fewshot
from launcher.commands import moe

COMMAND_MODULES = [run, data, train, eval_, cluster, forest, moe, report, export, fewshot]
