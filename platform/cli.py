"""The ``omnidiff`` command. Each subcommand lives in its own module under ``platform/commands``.

A command module defines ``NAME``, ``HELP`` and ``register(parser)``; ``register`` adds its
arguments and sets ``parser.set_defaults(run=...)``. Every module of the package is a command,
found by name (a new command is a new file). Every failure a user can cause is a
:class:`omnidiff.UserError` (bad config, bad data, missing files, a run that stopped itself) and
ends as one ``error:`` line with the error's exit code (2: config / input, 3: run stopped), never
a traceback; ``--debug`` shows the traceback too.

Start-up messages a user cannot act on (:data:`KNOWN_NOISE`) are silenced here, by message, for
this process and the workers it starts; ``--debug`` shows them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import sys
import traceback
import warnings

from omnidiff import UserError
from omnidiff.platform import commands
from omnidiff.platform.commands import CommandError

__all__ = ["CommandError", "KNOWN_NOISE", "build_parser", "main"]

# (category, start of the message): what the stack says on every start that no user can act on
KNOWN_NOISE = (
    # megatron-core without the GPU stack, once per module that would use it: the portable
    # optimizer and kernels are used (a GPU image has both; parallel/gpu_stack.py checks it)
    (UserWarning, "Transformer Engine and Apex are not installed"),
    # megatron-core 0.16 converting its own default cuda_graph_scope ("full"); no graphs are captured
    (UserWarning, "full scope is deprecated"),
    # called inside DeepSpeed's ZeRO partitioned gradients, not by omnidiff
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
)


def silence_known_noise() -> None:
    """Filter :data:`KNOWN_NOISE` here and in the workers this process spawns (they start with
    its filters, ``parallel/launcher.py``; workers under torchrun start here). Without a GPU,
    DeepSpeed is told its accelerator (``DS_ACCELERATOR``, its own override, inherited by the
    workers) instead of warning in every process that it found none."""
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


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
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors, and the start-up warnings hidden by default")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.register(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        silence_known_noise()
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
