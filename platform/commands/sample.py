"""``omnidiff sample MODEL --task TASK ...``: generate text, images or speech with a trained model.

``MODEL`` is a checkpoint (``<output_dir>/checkpoints/step_*``), a run's output folder (its newest
checkpoint) or a Hugging Face folder (with ``run_config.yaml``, or ``--config``). Inputs are
encoded by the run's media tokenizers, the prompt is the training layout of the task
(:mod:`omnidiff.platform.sampling.tasks`), and outputs are printed (text) or written to ``--out``
(PNG images, WAV speech).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from pydantic import ValidationError

from omnidiff.platform.commands import CommandError

NAME = "sample"
HELP = "generate with a trained model: t2i, s2i, caption, asr, tts, svqa or text"

NEEDS = {  # task -> (inputs it reads, media tokenizers it loads)
    "t2i": (("prompt",), ("image",)), "s2i": (("speech",), ("image", "speech")),
    "caption": (("image",), ("image",)), "asr": (("speech",), ("speech",)),
    "tts": (("prompt",), ("speech",)), "svqa": (("speech", "image"), ("image", "speech")),
    "text": (("prompt",), ()),
}
SAMPLER_FLAGS = ("steps", "temperature", "top_p", "top_k", "confidence", "guidance", "block_size",
                 "position_penalty", "repeat_penalty")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder, run output folder or HF folder")
    parser.add_argument("--task", required=True, help=", ".join(NEEDS))
    parser.add_argument("--prompt", help="text: the message; t2i: the caption; tts: the text to "
                        "speak; caption: the question (default 'Describe the image.')")
    parser.add_argument("--image", help="input image file (caption, svqa)")
    parser.add_argument("--speech", help="input speech file (s2i, asr, svqa)")
    parser.add_argument("--length", type=int, help="answer tokens (text, caption, svqa; asr and "
                        "tts adapt to the input when not given)")
    parser.add_argument("--out", default="samples", help="folder for generated images and WAVs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="diffusion steps (default: per task)")
    parser.add_argument("--temperature", type=float, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--confidence", help="max_prob, margin or neg_entropy (default)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale w")
    parser.add_argument("--block-size", type=int, help="semi-autoregressive blocks of this size")
    parser.add_argument("--position-penalty", type=float, help="image default 2.0")
    parser.add_argument("--repeat-penalty", type=float)
    parser.add_argument("--restrict-modality", action="store_true",
                        help="image answers only image codes, TTS answers only speech codes "
                        "(the release does not restrict; helps barely trained models)")
    parser.add_argument("--config", help="run config YAML (vocabulary, tokenizers); needed for an "
                        "HF folder without run_config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="section.key=value",
                        help="override a run-config key, e.g. data.image_tokenizer.path=...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.data.tokens.text import build_vocab
    from omnidiff.platform.sampling import (
        SamplerConfig, TaskPrompts, generate, hf_logits_fn, load_model)

    if args.quiet:  # transformers' own bar while it reads an HF folder's weights too
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if args.task not in NEEDS:
        raise CommandError(f"unknown task {args.task!r}; one of {', '.join(NEEDS)}")
    inputs, media = NEEDS[args.task]
    missing = [f"--{name}" for name in inputs if getattr(args, name) is None]
    if missing:
        raise CommandError(f"task {args.task} needs {' and '.join(missing)}")
    loaded = load_model(args.model, args.config, args.set)
    cfg = loaded.config
    vocab, tokenizer = build_vocab(cfg.data)
    rows = loaded.model.config.vocab_size
    if rows < vocab.size:
        raise CommandError(f"the model has {rows} vocabulary rows; the run config's vocabulary "
                           f"needs {vocab.size}")
    tokenizers = _tokenizers(cfg, vocab, media)
    prompt = _task_prompt(args, TaskPrompts(vocab, tokenizer, args.restrict_modality),
                          tokenizers, cfg)
    request = prompt.request
    longest = len(request.tokens)
    if request.uncond_prompt is not None:
        longest = max(longest, len(request.uncond_prompt) + len(request.answer))
    if longest > cfg.data.seq_length:
        raise CommandError(f"{longest} tokens (prompt {request.start}, answer "
                           f"{len(request.answer)}) exceed the model's length data.seq_length="
                           f"{cfg.data.seq_length}")
    flags = {k: getattr(args, k) for k in SAMPLER_FLAGS if getattr(args, k) is not None}
    try:
        config = SamplerConfig(**{"label_shift": loaded.label_shift, **prompt.settings, **flags})
    except ValidationError as err:
        raise CommandError("; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: "
                                     f"{e['msg']}" for e in err.errors())) from None
    if config.guidance > 0 and request.uncond_prompt is None:
        raise CommandError(f"--guidance: task {args.task} has no unconditional prompt "
                           "(guidance is for t2i and s2i)")
    if args.steps is not None:
        request.steps = args.steps
    tokens = generate(hf_logits_fn(loaded.model), [request], config, mask_id=vocab.mask_id,
                      vocab_size=vocab.size, generator=torch.Generator().manual_seed(args.seed),
                      progress=not args.quiet)[0]
    _report(args, tokens[request.start:], vocab, tokenizer, tokenizers, cfg)
    return 0


def _tokenizers(cfg, vocab, media: tuple[str, ...]) -> dict:
    from omnidiff.platform.sampling.media import load_tokenizer

    blocks = {"image": vocab.image_codebook_size, "speech": vocab.speech_codebook_size}
    refs = {"image": cfg.data.image_tokenizer, "speech": cfg.data.speech_tokenizer}
    return {m: load_tokenizer(refs[m], m, blocks[m], f"data.{m}_tokenizer") for m in media}


def _task_prompt(args, prompts, tokenizers: dict, cfg):
    from omnidiff.platform.sampling import media

    image = speech = None
    if args.image is not None and "image" in tokenizers:
        image = media.encode_image_file(args.image, tokenizers["image"], cfg.data.image_size)
    if args.speech is not None and "speech" in tokenizers:
        speech = media.encode_speech_file(args.speech, tokenizers["speech"])
    if args.task == "t2i":
        return prompts.text_to_image(args.prompt, _image_codes(cfg, tokenizers["image"]),
                                     torch.Generator().manual_seed(args.seed))
    if args.task == "s2i":
        return prompts.speech_to_image(speech, _image_codes(cfg, tokenizers["image"]))
    length = {} if args.length is None else {"length": args.length}
    if args.task == "caption":
        question = {} if args.prompt is None else {"question": args.prompt}
        return prompts.caption(image, **question, **length)
    if args.task == "asr":
        return prompts.asr(speech, **length)
    if args.task == "tts":
        return prompts.tts(args.prompt, **length)
    if args.task == "svqa":
        return prompts.spoken_vqa(speech, image, **length)
    return prompts.text(args.prompt, **length)


def _image_codes(cfg, tokenizer) -> int:
    """Codes of one generated image (``data.generated_image_size``, as training made them)."""
    return (cfg.data.generated_image_size // tokenizer.downsample) ** 2


def _report(args, answer, vocab, tokenizer, tokenizers: dict, cfg) -> None:
    """Print the text; write images and speech to ``--out``."""
    from omnidiff.platform.sampling import media
    from omnidiff.platform.sampling.tasks import answer_image_codes, answer_speech_codes, answer_text

    out = Path(args.out)
    if args.task in ("t2i", "s2i"):
        image_tok = tokenizers["image"]
        codes = answer_image_codes(answer, vocab, _image_codes(cfg, image_tok))
        if codes is None:
            raise CommandError("the model generated no image codes (--restrict-modality "
                               "makes it generate only image codes)")
        _write(out / f"{args.task}-{args.seed}.png",
               media.png_bytes(media.decode_image(codes, image_tok)))
        return
    if args.task in ("tts", "svqa"):
        codes = answer_speech_codes(answer, vocab)
        if len(codes):
            speech_tok = tokenizers["speech"]
            wave, rate = media.decode_speech(codes, speech_tok), speech_tok.decoded_sample_rate
            _write(out / f"{args.task}-{args.seed}.wav", media.wav_bytes(wave, rate),
                   f"{len(codes)} speech codes -> {len(wave) / rate:.2f} s at {rate} Hz")
        elif args.task == "tts":
            raise CommandError("the model generated no speech codes (--restrict-modality "
                               "makes it generate only speech codes)")
    if args.task != "tts":
        print(answer_text(answer, vocab, tokenizer))


def _write(path: Path, data: bytes, what: str = "") -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as err:
        raise CommandError(f"cannot write {path}: {err.strerror or err}") from None
    print(f"wrote {path}" + (f" ({what})" if what else ""))
