"""``omnidiff fit-tokenizers DATA OUT_DIR``: fit the demo image and speech tokenizers to shards."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "fit-tokenizers"
HELP = ("fit the built-in demo tokenizers (patch k-means images, log-mel k-means speech, "
        "optionally byte-level BPE text) to media shards (a mixture.yaml: all its sources; or "
        "shard specs)")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", help="a mixture.yaml, or shard paths / globs / ranges")
    parser.add_argument("--out", required=True, help="folder for image.safetensors, speech.safetensors")
    parser.add_argument("--samples", type=int, default=1000, help="samples to fit on (one pass at most)")
    parser.add_argument("--image-codes", type=int, default=512, help="image codebook size (<= 8192)")
    parser.add_argument("--speech-codes", type=int, default=512, help="speech codebook size (<= 16384)")
    parser.add_argument("--patch-size", type=int, default=8, help="pixels per image code, each side")
    parser.add_argument("--image-size", type=int, default=64, help="input images, px (data.image_size)")
    parser.add_argument("--generated-image-size", type=int, default=32,
                        help="generated images, px (data.generated_image_size)")
    parser.add_argument("--text-vocab", type=int, default=0,
                        help="also fit a byte-level BPE text tokenizer of this size into OUT/text "
                        "(0: keep the byte tokenizer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.data.tokenizers.demo_text import MIN_TEXT_VOCAB
    from omnidiff.data.tokenizers.fit import fit_demo_tokenizers
    from omnidiff.data.media.reader import MediaReaderConfig
    from omnidiff.data.streams.mixture import load_mixture_config
    from omnidiff.platform.commands import CommandError

    groups = [list(args.data)]  # one reader per mixture source, so each gets its share
    if len(args.data) == 1 and args.data[0].endswith((".yaml", ".yml")):
        mixture = load_mixture_config(args.data[0])
        groups = [mixture.shard_specs(name) for name in mixture.sources]
    if args.text_vocab and args.text_vocab < MIN_TEXT_VOCAB:
        raise CommandError(f"--text-vocab {args.text_vocab}: a byte-level BPE needs at least "
                           f"{MIN_TEXT_VOCAB} entries (256 bytes, the chat specials, merges)")
    for size in (args.image_size, args.generated_image_size):
        if size % args.patch_size:
            raise CommandError(f"image sizes must be multiples of --patch-size {args.patch_size}, "
                               f"got {size}")
    configs = [MediaReaderConfig(shards=shards, image_size=args.image_size,
                                 generated_image_size=args.generated_image_size, seed=args.seed)
               for shards in groups]
    fitted = fit_demo_tokenizers(configs, args.out, args.samples, args.image_codes,
                                 args.speech_codes, args.patch_size, args.seed,
                                 progress=not args.quiet)
    print(f"fitted on {fitted.images} images and {fitted.clips} speech clips; use with:")
    for line in fitted.config_lines():
        print(f"  {line}")
    if args.text_vocab:
        from omnidiff.data.tokenizers.demo_text import fit_text_tokenizer, shard_texts

        texts = shard_texts([spec for group in groups for spec in group], args.samples)
        folder = fit_text_tokenizer(texts, Path(args.out) / "text", args.text_vocab)
        print(f"  data.text_tokenizer={folder}")
    return 0
