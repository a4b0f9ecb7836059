"""The ``omnidiff`` command. Each subcommand lives in its own module under ``platform/commands``.

A command module defines ``NAME``, ``HELP`` and ``register(parser)``; ``register`` adds its
arguments and sets ``parser.set_defaults(run=...)``. Every module of the package is a command,
found by name (a new command is a new file). Every failure a user can cause is a
:class:`omnidiff.UserError` (bad config, bad data, missing files, a run that stopped itself) and
ends as one ``error:`` line with the error's exit code (2: config / input, 3: run stopped), never
a traceback; ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

from omnidiff import UserError
from omnidiff.platform import commands
from omnidiff.platform.commands import CommandError

__all__ = ["CommandError", "build_parser", "main"]


def command_modules() -> list:
    """Every command module, ``train`` first, then by name."""
    names = sorted(info.name for info in pkgutil.iter_modules(commands.__path__))
    names.sort(key=lambda name: name != "train")
    return [importlib.import_module(f"{commands.__name__}.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnidiff",
        description="Train any-to-any multimodal masked-diffusion models (text, image, speech).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.register(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (UserError, FileNotFoundError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
