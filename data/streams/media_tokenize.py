"""Decoded media samples -> token samples: media tokenizers, then the ChatML sequence builder.

The step between the DALI reader and packing. Images of a batch are encoded together (one
tokenizer call per image size: input images and generated images differ), speech clips in one
call; the codes fill the sample's placeholders in order (:class:`SequenceBuilder`). A sample that
cannot become a sequence (placeholders and media disagree, codes outside the vocabulary block) or
that is longer than a packed row is rejected with a reason, never raised.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from omnidiff import UserError
from omnidiff.data.media.reader import MediaBatch, MediaSample
from omnidiff.data.tokens.packing import TokenSample
from omnidiff.data.tokens.sequences import SPEECH_PLACEHOLDER, SampleError, SequenceBuilder
from omnidiff.data.tokenizers.base import ImageTokenizer, SpeechTokenizer, load_media_tokenizer
from omnidiff.data.tokens.vocab import UnifiedVocab


class MediaTokenizerError(UserError, ValueError):
    """Configured media tokenizers that cannot serve this vocabulary."""


@dataclass
class Rejected:
    """Why one sample produced no token sequence (``reason`` is a reader skip reason)."""

    reason: str
    detail: str


def load_speech_encoder(data):
    """The frozen SenseVoice encoder of a continuous-speech run (``data.speech_encoder``)."""
    if data.speech_input != "continuous" or not data.speech_encoder:
        return None
    from omnidiff.data.tokenizers.sensevoice import SenseVoiceSpeechEncoder

    try:
        encoder = SenseVoiceSpeechEncoder.from_pretrained(data.speech_encoder)
    except (ValueError, FileNotFoundError) as err:
        raise MediaTokenizerError(f"data.speech_encoder: {err}") from None
    if encoder.output_size != data.speech_feature_size:
        raise MediaTokenizerError(f"data.speech_encoder gives {encoder.output_size}-d features; "
                                  f"data.speech_feature_size is {data.speech_feature_size}")
    return encoder


def load_tokenizers(image_ref, speech_ref, vocab: UnifiedVocab
                    ) -> tuple[ImageTokenizer, SpeechTokenizer]:
    """Load both media tokenizers ({kind, path} refs) and check they fit the vocabulary blocks."""
    try:
        image = load_media_tokenizer(image_ref.kind, image_ref.path)
        speech = load_media_tokenizer(speech_ref.kind, speech_ref.path)
    except (ValueError, FileNotFoundError) as err:
        raise MediaTokenizerError(f"data.image_tokenizer / data.speech_tokenizer: {err}") from None
    for name, tokenizer, modality, block in (
            ("image_tokenizer", image, "image", vocab.image_codebook_size),
            ("speech_tokenizer", speech, "speech", vocab.speech_codebook_size)):
        if tokenizer.modality != modality:
            raise MediaTokenizerError(f"data.{name}: kind {tokenizer.modality} tokenizer, expected {modality}")
        if tokenizer.codebook_size > block:
            raise MediaTokenizerError(f"data.{name}: codebook of {tokenizer.codebook_size} codes does not fit "
                             f"the vocabulary's {block} {modality} ids (data.{modality}_codebook_size)")
    return image, speech


class SampleTokenizer:
    """``MediaBatch -> [TokenSample | Rejected]`` in sample order.

    With a ``speech_encoder`` (continuous speech input) the speech a sample's system / user turns
    hold becomes that encoder's features; assistant speech (what the model says) stays codes.
    """

    def __init__(self, builder: SequenceBuilder, image: ImageTokenizer, speech: SpeechTokenizer,
                 max_length: int, speech_encoder=None) -> None:
        self.builder, self.image, self.speech = builder, image, speech
        self.max_length = max_length
        self.speech_encoder = speech_encoder

    def _heard(self, sample: MediaSample) -> list[bool]:
        """Per audio clip: encoded as features (heard) rather than codes."""
        roles = sample.record.media_roles(SPEECH_PLACEHOLDER)
        return [self.speech_encoder is not None and role != "assistant" for role in roles]

    @torch.no_grad()
    def __call__(self, batch: MediaBatch) -> list[TokenSample | Rejected]:
        image_codes = self._encode_images([img for s in batch.samples for img in s.images])
        clips = [(wav, heard) for s in batch.samples for wav, heard in zip(s.audios, self._heard(s))]
        said = iter(_isolated(self._encode_speech, [wav for wav, heard in clips if not heard]))
        features = iter(_isolated(self.speech_encoder, [wav for wav, heard in clips if heard])
                        if self.speech_encoder is not None else [])
        speech_codes = [next(features) if heard else next(said) for _, heard in clips]
        out: list[TokenSample | Rejected] = []
        for sample in batch.samples:
            images = [image_codes.pop(0) for _ in sample.images]
            speech = [speech_codes.pop(0) for _ in sample.audios]
            out.append(_first_failure(images, speech) or self._sequence(sample, images, speech))
        return out

    def _sequence(self, sample: MediaSample, images: list[torch.Tensor],
                  speech: list[torch.Tensor]) -> TokenSample | Rejected:
        try:
            tokens = self.builder.build_from_messages(
                [m.model_dump() for m in sample.record.messages], images, speech,
                task=sample.record.task)
        except SampleError as err:
            return Rejected("bad_sequence", str(err))
        if len(tokens) > self.max_length:
            return Rejected("too_long", f"{len(tokens)} tokens > seq_length {self.max_length}")
        return tokens

    def _encode_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """One row-major 1-D code tensor per image, encoding same-sized images together."""
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            by_size[tuple(image.shape)].append(index)
        codes: list[torch.Tensor | str] = [""] * len(images)
        for indices in by_size.values():
            encoded = _isolated(lambda group: [grid.reshape(-1) for grid in self.image.encode(
                torch.stack(group).to(self.image.device))], [images[i] for i in indices])
            for i, result in zip(indices, encoded):
                codes[i] = result
        return codes

    def _encode_speech(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        device = self.speech.device
        return self.speech.encode([clip.to(device) for clip in clips]) if clips else []


def _first_failure(images: list, speech: list) -> Rejected | None:
    """The first medium of a sample its tokenizer refused (codes are a message there)."""
    for reason, kind, group in (("bad_image", "image", images), ("bad_audio", "audio", speech)):
        for index, codes in enumerate(group):
            if isinstance(codes, str):
                return Rejected(reason, f"{kind}{index}: the tokenizer refused it ({codes})")
    return None


def _isolated(encode, items: list) -> list:
    """``encode(items)``; if the batch fails, item by item, failures as their message.

    One bad item (e.g. audio a tokenizer cannot take) must not sink the whole batch.
    """
    if not items:
        return []
    try:
        return list(encode(items))
    except (ValueError, RuntimeError) as err:
        if len(items) == 1:
            return [str(err).splitlines()[0] if str(err) else type(err).__name__]
    return [result for item in items for result in _isolated(encode, [item])]
