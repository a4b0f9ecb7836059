"""The ``omnidiff`` command. Each subcommand lives in its own module under ``platform/commands``.

A command module defines ``NAME``, ``HELP`` and ``register(parser)``; ``register`` adds its
arguments and sets ``parser.set_defaults(run=...)``. Expected failures (bad config, bad data,
missing files) raise :class:`CommandError` or :class:`ConfigError` and end as one ``error:`` line
with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from omnidiff.platform.config import ConfigError

COMMAND_MODULES = (
    "omnidiff.platform.commands.train",
    "omnidiff.platform.commands.demo_data",
)


class CommandError(RuntimeError):
    """A failure to report to the user in one line (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnidiff",
        description="Train any-to-any multimodal masked-diffusion models (text, image, speech).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.register(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, CommandError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
