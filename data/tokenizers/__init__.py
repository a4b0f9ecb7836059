"""Media tokenizers (image, speech) behind one interface; see :mod:`omnidiff.data.tokenizers.base`."""

from omnidiff.data.tokenizers.base import (
    ImageTokenizer,
    MediaTokenizer,
    SpeechTokenizer,
    load_media_tokenizer,
    media_tokenizer_kinds,
)

__all__ = ["ImageTokenizer", "MediaTokenizer", "SpeechTokenizer", "load_media_tokenizer", "media_tokenizer_kinds"]
