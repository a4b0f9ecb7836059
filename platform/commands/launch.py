"""``omnidiff launch [--] COMMAND ...``: run an omnidiff command as node k of N under torchrun.

The container command of every Kubernetes workload kind (see ``k8s/launch.py``): the node's
place in the job comes from the variables the operator injected (``PET_*``, ``MASTER_ADDR`` /
``NODE_RANK``, ``JOB_COMPLETION_INDEX``); this process becomes ``torchrun`` with them.
"""

from __future__ import annotations

import argparse
import os
import shlex

NAME = "launch"
HELP = "run an omnidiff command (e.g. train CONFIG) under torchrun as node k of N, from the env"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print", action="store_true",
                        help="print the torchrun command instead of running it")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the omnidiff command and its arguments, e.g. -- train CONFIG")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.k8s.launch import torchrun_argv

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    argv = torchrun_argv(os.environ, command)
    if args.print:
        print(shlex.join(argv))
        return 0
    os.execv(argv[0], argv)  # torchrun takes this process over (signals reach it directly)
    return 0
