"""The ``omnidiff`` command. Each subcommand lives in its own module under ``platform/commands``.

A command module defines ``NAME``, ``HELP`` and ``register(parser)``; ``register`` adds its
arguments and sets ``parser.set_defaults(run=...)``. Expected failures (bad config, bad data,
missing files) raise :class:`CommandError` or :class:`ConfigError` and end as one ``error:`` line
with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator

from omnidiff.platform.config import ConfigError

COMMAND_MODULES = (
    "omnidiff.platform.commands.train",
    "omnidiff.platform.commands.demo_data",
    "omnidiff.platform.commands.fit_tokenizers",
    "omnidiff.platform.commands.tokenize",
)


class CommandError(RuntimeError):
    """A failure to report to the user in one line (no traceback)."""


@contextlib.contextmanager
def data_errors() -> Iterator[None]:
    """Turn the data layer's expected failures (bad shards, mixtures, tokenizers) into one line."""
    from omnidiff.data.media_reader import MediaReaderError
    from omnidiff.data.media_tokenize import MediaTokenizerError
    from omnidiff.data.mixture import MixtureConfigError
    from omnidiff.data.mixture_sampler import MixtureError
    from omnidiff.data.shards import ShardError
    from omnidiff.data.tokenizers.checkpoint import CheckpointMismatchError

    try:
        yield
    except (ShardError, MixtureConfigError, MixtureError, MediaReaderError, MediaTokenizerError,
            CheckpointMismatchError) as err:
        raise CommandError(str(err)) from None


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
