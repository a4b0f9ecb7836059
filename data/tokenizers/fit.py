"""Fit the built-in demo tokenizers (patch k-means images, log-mel k-means speech) to shards.

The demo has no pretrained MAGVIT-v2 / GLM-4-Voice weights (nothing may be downloaded), so its
tokenizers are fitted to the demo data itself: samples are read through the same DALI reader as
training (so they see exactly the decoded, resized media the model will), their images and
speech collected, and each codebook clustered. The results load with ``load_media_tokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from omnidiff.data.media.reader import MediaReader, MediaReaderConfig
from omnidiff.data.tokenizers.demo_image import KIND as IMAGE_KIND, PatchKMeansImageTokenizer
from omnidiff.data.tokenizers.demo_speech import KIND as SPEECH_KIND, MelKMeansSpeechTokenizer


@dataclass
class FittedTokenizers:
    image_path: Path
    speech_path: Path
    images: int  # media the codebooks were fitted on
    clips: int

    def config_lines(self) -> list[str]:
        """The ``data`` keys that make a run use these tokenizers."""
        return [f"data.image_tokenizer={{kind: {IMAGE_KIND}, path: {self.image_path}}}",
                f"data.speech_tokenizer={{kind: {SPEECH_KIND}, path: {self.speech_path}}}"]


def read_media(reader_configs: list[MediaReaderConfig], samples: int, progress: bool = True
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Images and speech clips of up to ``samples`` samples, an equal share from each reader
    (one pass at most each, so every source's media are represented)."""
    images: list[torch.Tensor] = []
    clips: list[torch.Tensor] = []
    share = -(-samples // len(reader_configs))
    with tqdm(total=samples, desc="read media", unit="sample", disable=not progress) as bar:
        for config in reader_configs:
            reader = MediaReader(config)
            limit = min(share, reader.epoch_size)
            while reader.samples_read < limit:
                before = reader.samples_read
                for sample in next(reader).samples:
                    images += sample.images
                    clips += sample.audios
                bar.update(min(reader.samples_read, limit) - before)
    return images, clips


def demo_speech_encoder(clips: list[torch.Tensor], out_dir: str | Path, output_size: int,
                        seed: int = 0) -> Path:
    """A small SenseVoiceSmall-layout encoder for the demo's continuous speech input: the real
    front end with CMVN measured on ``clips``, a few SAN-M layers with random, frozen weights
    (nothing pretrained can be downloaded here; random features of the fbank still carry what
    was said). Saved in the released layout, so the run loads it like the real one."""
    from omnidiff.data.tokenizers.sensevoice import (
        SenseVoiceConfig, SenseVoiceSmall, SenseVoiceSpeechEncoder)

    torch.manual_seed(seed)
    config = SenseVoiceConfig(output_size=output_size, attention_heads=4,
                              linear_units=2 * output_size, num_blocks=2, tp_blocks=1)
    encoder = SenseVoiceSpeechEncoder(SenseVoiceSmall(config), None)
    feats = torch.cat(encoder.features(clips[:256]))
    encoder.cmvn = torch.stack([-feats.mean(0), 1 / feats.std(0).clamp(min=1e-5)])
    return encoder.save_pretrained(out_dir)


def fit_demo_tokenizers(reader_configs: list[MediaReaderConfig], out_dir: str | Path,
                        samples: int, image_codes: int, speech_codes: int, patch_size: int = 8,
                        seed: int = 0, progress: bool = True) -> FittedTokenizers:
    """Fit both demo codebooks on the media of up to ``samples`` samples (:func:`read_media`)."""
    images, clips = read_media(reader_configs, samples, progress)
    if not images or not clips:
        raise ValueError(f"the samples read hold {len(images)} images and {len(clips)} speech "
                         "clips; both tokenizers need some")
    by_size: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for image in images:
        by_size.setdefault(tuple(image.shape), []).append(image)
    groups = sorted(by_size.values(), key=lambda g: g[0].shape[-1])  # the smallest is native
    image_tok = PatchKMeansImageTokenizer.fit([torch.stack(g) for g in groups], image_codes, seed,
                                              patch_size=patch_size)
    speech_tok = MelKMeansSpeechTokenizer.fit(clips, speech_codes, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return FittedTokenizers(image_tok.save(out_dir / "image.safetensors"),
                            speech_tok.save(out_dir / "speech.safetensors"), len(images),
                            len(clips))
