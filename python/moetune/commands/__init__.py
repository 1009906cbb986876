"""The `moetune` subcommands beyond train / demo / info, one module each.

Each module has `add_parser(subparsers)` and `run(args) -> int` (the exit status); `moetune.cli`
only registers and dispatches them. Errors a user can fix (a bad path, a dense model, no GPU,
a Hub id not in the cache while offline) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

NAMES = ("eval", "export", "chat", "env")


def version_line() -> str:
    import moetune

    return f"moetune {moetune.__version__}"


def add_parsers(sub) -> None:
    for name in NAMES:
        importlib.import_module(f"moetune.commands.{name}").add_parser(sub)


def run(args) -> int:
    from moetune.commands.common import UsageError

    try:
        return importlib.import_module(f"moetune.commands.{args.command}").run(args)
    except UsageError as e:
        print(f"moetune {args.command}: error: {e}", file=sys.stderr)
        return 2
