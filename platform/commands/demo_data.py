"""``omnidiff demo-data OUT_DIR``: write the built-in demo dataset (images + speech, all tasks)."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo-data"
HELP = "build the demo dataset: rendered scenes, photos and speech for every task, as shards"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="output folder (must be empty or new unless --overwrite)")
    parser.add_argument("--samples", type=int, default=3000,
                        help="total samples over all tasks (default 3000; e.g. 40 for a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speech", choices=("auto", "espeak", "library"), default="auto",
                        help="espeak-ng, the committed word library, or auto (espeak-ng if installed)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=200, help="samples per tar shard")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.data.demo.build import build_demo_dataset
    from omnidiff.data.tokens.sequences import TASKS
    from omnidiff.platform.commands import CommandError

    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"{out_dir} exists and is not a folder")
    existing = sorted(out_dir.glob("*")) if out_dir.is_dir() else []
    if existing:
        foreign = [p.name for p in existing
                   if p.suffix not in (".tar", ".idx") and p.name != "mixture.yaml"]
        if foreign or not args.overwrite:
            raise CommandError(f"{out_dir} is not empty" + (
                f" (holds {foreign[:3]}, not a demo dataset)" if foreign else "; pass --overwrite"))
        for path in existing:
            path.unlink()
    if args.samples < len(TASKS):
        raise CommandError(f"--samples must be at least {len(TASKS)} (one per task)")
    if args.image_size < 16 or args.shard_size < 1:
        raise CommandError("--image-size must be >= 16 and --shard-size >= 1")
    summary = build_demo_dataset(out_dir, args.samples, args.seed, args.speech,
                                 args.image_size, args.shard_size, args.workers,
                                 progress=not args.quiet)
    counts = ", ".join(f"{task} {n}" for task, n in summary.counts.items())
    shards = sum(len(names) for names in summary.shards.values())
    print(f"wrote {sum(summary.counts.values())} samples ({counts}) in {shards} shards, "
          f"{summary.bytes / 1e6:.1f} MB, speech by {summary.speech_backend}, "
          f"in {summary.seconds:.1f} s; mixture: {summary.mixture}")
    return 0
