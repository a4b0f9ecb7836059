"""What a job with a ``prepare`` section builds itself when it is missing (the demo's data):
demo shards, demo tokenizers fitted to them, then token shards of every source, each step
skipped when its output exists."""

from __future__ import annotations

from pathlib import Path

from omnidiff.jobs.curriculum import JobConfig, deep_merge
from omnidiff.platform.config import build_config

HELDOUT_DIR = "heldout"
HELDOUT_SEED = 1  # the training set is seed 0: other scenes, photos and sentences


def prepare(job: JobConfig) -> None:
    spec = job.prepare
    if spec is None:
        return
    from omnidiff.data.demo.build import build_demo_dataset
    from omnidiff.data.media.reader import MediaReaderConfig
    from omnidiff.data.streams.mixture import load_mixture_config
    from omnidiff.data.streams.pretokenize import tokenize_shards
    from omnidiff.data.tokenizers.demo_text import TOKENIZER_FILE, fit_text_tokenizer, shard_texts
    from omnidiff.data.tokenizers.fit import demo_speech_encoder, fit_demo_tokenizers, read_media
    from omnidiff.data.tokens.text import build_vocab

    data, tokenizers = Path(spec.demo_data), Path(spec.tokenizers)
    media_mixture = data / "mixture.yaml"
    if not media_mixture.is_file():
        print(f"prepare: demo dataset ({spec.samples} samples) -> {data}")
        build_demo_dataset(data, spec.samples, image_size=max(spec.image_size, 64))
    heldout = data / HELDOUT_DIR
    if spec.heldout_samples and not (heldout / "mixture.yaml").is_file():
        print(f"prepare: held-out demo set ({spec.heldout_samples} samples) -> {heldout}")
        build_demo_dataset(heldout, spec.heldout_samples, seed=HELDOUT_SEED,
                           image_size=max(spec.image_size, 64))
    mixture = load_mixture_config(media_mixture)
    if not (tokenizers / "speech.safetensors").is_file():
        print(f"prepare: demo tokenizers -> {tokenizers}")
        configs = [MediaReaderConfig(shards=mixture.shard_specs(name), image_size=spec.image_size,
                                     generated_image_size=spec.generated_image_size)
                   for name in mixture.sources]
        fit_demo_tokenizers(configs, tokenizers, min(spec.samples, 1000), spec.image_codes,
                            spec.speech_codes)
    if spec.text_vocab and not (tokenizers / "text" / TOKENIZER_FILE).is_file():
        print(f"prepare: demo text tokenizer ({spec.text_vocab} entries) -> {tokenizers / 'text'}")
        specs = [s for name in mixture.sources for s in mixture.shard_specs(name)]
        fit_text_tokenizer(shard_texts(specs, spec.samples), tokenizers / "text", spec.text_vocab)
    run = job.stage_run_config(0)
    if spec.speech_encoder and not (Path(spec.speech_encoder) / "model.pt").is_file():
        print(f"prepare: demo speech encoder -> {spec.speech_encoder}")
        configs = [MediaReaderConfig(shards=mixture.shard_specs(name)) for name in mixture.sources]
        _, clips = read_media(configs, min(spec.samples, 400))
        size = run.get("data", {}).get("speech_feature_size", 512)
        demo_speech_encoder(clips, spec.speech_encoder, size)
    token_mixture = Path(run.get("data", {}).get("mixture", ""))
    if run.get("data", {}).get("source") != "token_shards" or token_mixture.is_file():
        return
    print(f"prepare: token shards -> {token_mixture.parent}")
    cfg = build_config(deep_merge(run, {"data": {"source": "shards",
                                                  "mixture": str(media_mixture)}}))
    vocab, text = build_vocab(cfg.data)
    tokenize_shards(cfg.data, token_mixture.parent, vocab, text)
