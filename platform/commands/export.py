"""``omnidiff export CKPT OUT``: a checkpoint of any layout as a Hugging Face folder.

``CKPT`` is a checkpoint (``<output_dir>/checkpoints/step_*``) or a run's output folder (its
newest checkpoint); TP / PP shards and ZeRO partitions (stages 0-3) are merged. ``OUT`` then
loads with stock transformers, ``AutoModel.from_pretrained(OUT, trust_remote_code=True)``
(see :mod:`omnidiff.platform.hf_export` for what the folder holds).
"""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "merge a checkpoint (any TP / PP / ZeRO layout) into a Hugging Face folder"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder or run output folder")
    parser.add_argument("out", help="the Hugging Face folder to write (must be empty)")
    parser.add_argument("--shard-size", default="2GB",
                        help="largest safetensors file, e.g. 500MB, 5GB or bytes (default 2GB)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="weight dtype in the folder (default fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.platform.hf_export import export_checkpoint

    size = int(args.shard_size) if args.shard_size.isdigit() else args.shard_size
    out = export_checkpoint(args.checkpoint, args.out, max_shard_size=size, dtype=args.dtype,
                            overwrite=args.overwrite, progress=not args.quiet)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
