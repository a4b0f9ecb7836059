"""``omnidiff plan``: rank the parallel layouts of a model on a cluster and write the best as a job.

Memory per GPU and step time come from the planner's model (``jobs/plan_model.py``; its memory
model is checked against measured CPU peaks by ``tests/test_planner.py``); the job file is
``--base`` (default: the production curriculum) with ``run.parallel`` and ``cluster`` filled in.
"""

from __future__ import annotations

import argparse

from omnidiff.jobs.plan_model import Workload
from omnidiff.jobs.planner import GIB, GPUS, Cluster, plan, table, write_job
from omnidiff.parallel.config import ModelConfig
from omnidiff.parallel.presets import MODEL_PRESETS
from omnidiff.platform.commands import CommandError

NAME = "plan"
HELP = "plan a TP / PP / DP / ZeRO / recompute / FP8 layout for a cluster and write its job file"
FULL_VOCAB = 176_264  # REFERENCE §2: text + multimodal specials + speech + image codes


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="dream-7b", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--seq-length", type=int, default=3072)
    parser.add_argument("--global-batch", type=int, default=128, help="sequences per step")
    parser.add_argument("--vocab", type=int, default=FULL_VOCAB, help="embedding rows")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--nvlink", type=float, default=None,
                        help="achievable NVLink bus bandwidth per GPU, GB/s (default: the GPU's)")
    parser.add_argument("--ib", type=float, default=45.0,
                        help="achievable InfiniBand bandwidth per GPU, GB/s")
    parser.add_argument("--fp8", default="auto",
                        help="auto (bf16 and the GPU's FP8 recipe), none, or a recipe")
    parser.add_argument("--top", type=int, default=10, help="rows of the table")
    parser.add_argument("--base", default="omni-diffusion", help="job file the plan fills in")
    parser.add_argument("--out", default="runs/plan/job.yaml", help="job file to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if min(args.seq_length, args.global_batch, args.vocab, args.top) < 1:
        raise CommandError("--seq-length, --global-batch, --vocab and --top must be >= 1")
    if args.fp8 not in ("auto", "none", "delayed", "tensorwise", "blockwise", "mxfp8"):
        raise CommandError(f"--fp8 {args.fp8}: auto, none, delayed, tensorwise, blockwise "
                           "or mxfp8")
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu, args.nvlink, args.ib)
    work = Workload(ModelConfig(preset=args.preset), args.vocab, args.seq_length,
                    args.global_batch)
    plans = plan(work, cluster, args.fp8)
    fitting = [p for p in plans if p.fits]
    if not fitting:
        smallest = min(plans, key=lambda p: p.memory["total"]) if plans else None
        hint = (f"; the smallest needs {smallest.memory['total'] / GIB:.1f} GiB per GPU"
                if smallest else "")
        raise CommandError(f"no layout of {args.preset} fits {args.nodes} x "
                           f"{args.gpus_per_node} {args.gpu}{hint}")
    print(f"{args.preset}, sequence {args.seq_length}, global batch {args.global_batch}, "
          f"{args.nodes} x {args.gpus_per_node} {args.gpu}: {len(fitting)} of {len(plans)} "
          "layouts fit")
    print(table(plans, args.top))
    path = write_job(fitting[0], cluster, args.preset, args.seq_length, args.global_batch,
                     args.out, args.base)
    print(f"job file: {path}")
    return 0
