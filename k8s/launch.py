"""The launch contract: one container command that runs as node k of N under any operator.

Each operator tells a pod where it stands in its own variables: Kubeflow Trainer (TrainJob) and
the training operator (PyTorchJob) inject ``PET_NNODES``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_NPROC_PER_NODE`` (torchrun's own names); other
set-ups give ``MASTER_ADDR`` / ``NODE_RANK``; an indexed Job (a JobSet's) gives
``JOB_COMPLETION_INDEX``. :func:`torchrun_argv` maps whichever are present, first found wins,
to one ``torchrun`` (``torch.distributed.run``) invocation of ``omnidiff`` with the given
arguments, so every node runs the same command.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from omnidiff import UserError

DEFAULT_PORT = 29500
# torchrun option -> the variables that may carry it, in order of preference, and its default
SOURCES: dict[str, tuple[tuple[str, ...], str]] = {
    "nnodes": (("PET_NNODES", "NNODES"), "1"),
    "node_rank": (("PET_NODE_RANK", "NODE_RANK", "JOB_COMPLETION_INDEX"), "0"),
    "master_addr": (("PET_MASTER_ADDR", "MASTER_ADDR"), "127.0.0.1"),
    "master_port": (("PET_MASTER_PORT", "MASTER_PORT"), str(DEFAULT_PORT)),
    "nproc_per_node": (("PET_NPROC_PER_NODE", "NPROC_PER_NODE"), "auto"),
}


class LaunchError(UserError):
    """The pod's environment does not describe a valid place in the job."""


def rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's rendezvous options from ``env``; checked, one line per problem."""
    out = {}
    for option, (names, default) in SOURCES.items():
        source = next((name for name in names if env.get(name, "").strip()), None)
        value = env[source].strip() if source else default
        out[option] = value
        if option in ("nnodes", "node_rank", "master_port") and not value.isdigit():
            raise LaunchError(f"{source}={value!r}: expected a whole number for --{option}")
    if int(out["node_rank"]) >= int(out["nnodes"]) or int(out["nnodes"]) < 1:
        raise LaunchError(f"node rank {out['node_rank']} is outside a job of "
                          f"{out['nnodes']} node(s)")
    per_node = out["nproc_per_node"]
    if not (per_node.isdigit() and int(per_node) > 0) and per_node not in ("auto", "gpu",
                                                                             "cpu"):
        raise LaunchError(f"nproc_per_node {per_node!r}: expected a positive number, auto, "
                          "gpu or cpu")
    return out


def torchrun_argv(env: Mapping[str, str], command: list[str]) -> list[str]:
    """``python -m torch.distributed.run <rendezvous> -m omnidiff.platform.cli <command>``."""
    if not command:
        raise LaunchError("nothing to launch: give an omnidiff command, e.g. "
                          "`omnidiff launch -- train CONFIG`")
    options = [f"--{option}={value}" for option, value in rendezvous(env).items()]
    return [sys.executable, "-m", "torch.distributed.run", *options,
            "-m", "omnidiff.platform.cli", *command]
