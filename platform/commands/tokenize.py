"""``omnidiff tokenize CONFIG OUT_DIR``: pre-tokenise a run's media shards into token shards."""

from __future__ import annotations

import argparse

NAME = "tokenize"
HELP = ("pre-tokenise the media shards of a run config (its data section) into token shards; "
        "train on them with data.source=token_shards data.mixture=OUT_DIR/mixture.yaml")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config whose data section reads media shards")
    parser.add_argument("out_dir", help="folder for the token shards and their mixture.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per token shard")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.data.streams.pretokenize import tokenize_shards
    from omnidiff.platform.commands import CommandError
    from omnidiff.platform.config import load_config
    from omnidiff.data.tokens.text import build_vocab

    cfg = load_config(args.config, args.overrides)
    if cfg.data.source != "shards":
        raise CommandError(f"data.source is {cfg.data.source}; tokenize reads media shards "
                           "(data.source=shards)")
    vocab, text = build_vocab(cfg.data)
    reports, mixture = tokenize_shards(cfg.data, args.out_dir, vocab, text, args.shard_size,
                                       progress=not args.quiet)
    for name, report in reports.items():
        skipped = ", ".join(f"{k} {v}" for k, v in report.skipped.items()) or "none"
        print(f"{name}: read {report.samples_read}, wrote {report.written} samples in "
              f"{len(report.shards)} token shards; skipped: {skipped}")
    print(f"mixture: {mixture}")
    return 0
