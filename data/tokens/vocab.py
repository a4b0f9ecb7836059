"""The unified vocabulary: text tokenizer entries + multimodal specials + speech codes + image codes.

Layout (the Omni-Diffusion scheme, for any text tokenizer)::

    [0, text_size)                      text tokenizer entries, incl. <|endoftext|> <|im_start|>
                                        <|im_end|> <|mask|> (appended when the tokenizer lacks them)
    text_size + [0, 21)                 MULTIMODAL_SPECIALS, in the released code's order
    speech_offset + [0, speech codes)   <|audio_0|> ...
    image_offset + [0, image codes)     <|image_0|> ...

With the Dream/Qwen2 tokenizer (151,667 entries) this gives exactly REFERENCE §2: mask 151666,
<|begin_of_image|> 151667, <|begin_of_audio|> 151684, speech 151688.., image 168072..176263.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK = "<|mask|>"
CHAT_SPECIALS = (ENDOFTEXT, IM_START, IM_END, MASK)

BEGIN_OF_IMAGE = "<|begin_of_image|>"
END_OF_IMAGE = "<|end_of_image|>"
BEGIN_OF_AUDIO = "<|begin_of_audio|>"
END_OF_AUDIO = "<|end_of_audio|>"
CONTEXT_OF_AUDIO = "<|context_of_audio|>"  # a continuous speech frame's place in the sequence

# Added right after the text tokenizer, in this order, by the released code: first the image /
# video / patch / quad / ref / box group, then the audio group.
MULTIMODAL_SPECIALS = (
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
    "<|context_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|context_of_video|>",
    "<|begin_of_patch|>",
    "<|end_of_patch|>",
    "<|context_of_patch|>",
    "<|begin_of_quad|>",
    "<|end_of_quad|>",
    "<|begin_of_ref|>",
    "<|end_of_ref|>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
    BEGIN_OF_AUDIO,
    END_OF_AUDIO,
    CONTEXT_OF_AUDIO,
    "<|audio|>",
)

# Facts about the Dream-7B (Qwen2) tokenizer, which cannot be loaded offline.
DREAM_TEXT_SIZE = 151_667
DREAM_CHAT_SPECIAL_IDS = {ENDOFTEXT: 151_643, IM_START: 151_644, IM_END: 151_645, MASK: 151_666}


class TextTokenizer(Protocol):
    """What the vocabulary and the sequence builders need from a text tokenizer."""

    def __len__(self) -> int: ...

    def token_to_id(self, token: str) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class UnifiedVocab:
    """Id arithmetic for the unified token space. Immutable and cheap to pass around."""

    text_size: int
    chat_special_ids: dict[str, int] = field(hash=False)
    speech_codebook_size: int = 16_384
    image_codebook_size: int = 8_192

    def __post_init__(self) -> None:
        missing = [t for t in CHAT_SPECIALS if t not in self.chat_special_ids]
        if missing:
            raise ValueError(f"text vocabulary lacks special tokens {missing}")
        if any(not 0 <= i < self.text_size for i in self.chat_special_ids.values()):
            raise ValueError("chat special ids must lie inside the text vocabulary")

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def dream(cls, speech_codebook_size: int = 16_384, image_codebook_size: int = 8_192):
        """The Omni-Diffusion vocabulary on the Dream-7B tokenizer (ids of REFERENCE §2)."""
        return cls(DREAM_TEXT_SIZE, dict(DREAM_CHAT_SPECIAL_IDS), speech_codebook_size,
                   image_codebook_size)

    @classmethod
    def from_text_tokenizer(
        cls, tokenizer: TextTokenizer, speech_codebook_size: int = 16_384,
        image_codebook_size: int = 8_192,
    ) -> UnifiedVocab:
        """Build the scheme on any tokenizer that already holds the four chat specials.

        If the tokenizer already contains the multimodal block (a saved Omni-Diffusion
        tokenizer), the text part ends where ``<|begin_of_image|>`` starts.
        """
        ids = {t: tokenizer.token_to_id(t) for t in CHAT_SPECIALS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"text tokenizer lacks special tokens {missing}")
        begin_image = tokenizer.token_to_id(BEGIN_OF_IMAGE)
        text_size = begin_image if begin_image is not None else len(tokenizer)
        return cls(text_size, ids, speech_codebook_size, image_codebook_size)

    # --- sizes and offsets ------------------------------------------------------------------
    @property
    def multimodal_offset(self) -> int:
        return self.text_size

    @property
    def speech_offset(self) -> int:
        return self.text_size + len(MULTIMODAL_SPECIALS)

    @property
    def image_offset(self) -> int:
        return self.speech_offset + self.speech_codebook_size

    @property
    def size(self) -> int:
        """Number of real token ids."""
        return self.image_offset + self.image_codebook_size

    def padded_size(self, tensor_parallel: int = 1) -> int:
        """Embedding rows: ``size`` rounded up to a multiple of 8 x TP (Megatron convention)."""
        multiple = 8 * tensor_parallel
        return -(-self.size // multiple) * multiple

    # --- named special tokens ---------------------------------------------------------------
    def special_id(self, token: str) -> int:
        if token in self.chat_special_ids:
            return self.chat_special_ids[token]
        if token in MULTIMODAL_SPECIALS:
            return self.multimodal_offset + MULTIMODAL_SPECIALS.index(token)
        raise KeyError(f"not a special token: {token}")

    @property
    def eos_id(self) -> int:
        """``<|endoftext|>``: pad = eos = bos, and the tail-pad token of the objective."""
        return self.chat_special_ids[ENDOFTEXT]

    @property
    def mask_id(self) -> int:
        return self.chat_special_ids[MASK]

    @property
    def im_start_id(self) -> int:
        return self.chat_special_ids[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.chat_special_ids[IM_END]

    @property
    def begin_of_image_id(self) -> int:
        return self.special_id(BEGIN_OF_IMAGE)

    @property
    def end_of_image_id(self) -> int:
        return self.special_id(END_OF_IMAGE)

    @property
    def begin_of_audio_id(self) -> int:
        return self.special_id(BEGIN_OF_AUDIO)

    @property
    def end_of_audio_id(self) -> int:
        return self.special_id(END_OF_AUDIO)

    def token_name(self, token_id: int) -> str | None:
        """The name of a special or code token (``<|image_5|>``); None for plain text ids."""
        for name, i in self.chat_special_ids.items():
            if i == token_id:
                return name
        if self.multimodal_offset <= token_id < self.speech_offset:
            return MULTIMODAL_SPECIALS[token_id - self.multimodal_offset]
        if self.speech_offset <= token_id < self.image_offset:
            return f"<|audio_{token_id - self.speech_offset}|>"
        if self.image_offset <= token_id < self.size:
            return f"<|image_{token_id - self.image_offset}|>"
        return None

    # --- codes <-> ids -----------------------------------------------------------------------
    def speech_ids(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return _codes_to_ids(codes, self.speech_offset, self.speech_codebook_size, "speech")

    def image_ids(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return _codes_to_ids(codes, self.image_offset, self.image_codebook_size, "image")

    def speech_codes(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return _ids_to_codes(ids, self.speech_offset, self.speech_codebook_size, "speech")

    def image_codes(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return _ids_to_codes(ids, self.image_offset, self.image_codebook_size, "image")

    def is_speech(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.speech_offset) & (ids < self.image_offset)

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_offset) & (ids < self.size)


def _check_codes(codes: torch.Tensor, count: int, what: str) -> torch.Tensor:
    if codes.numel() and (codes.min() < 0 or codes.max() >= count):
        raise ValueError(f"{what} out of range for a codebook of {count}")
    return codes


def _codes_to_ids(codes, offset: int, count: int, kind: str) -> torch.Tensor:
    codes = torch.as_tensor(codes, dtype=torch.long)
    return _check_codes(codes, count, f"{kind} codes") + offset


def _ids_to_codes(ids, offset: int, count: int, kind: str) -> torch.Tensor:
    codes = torch.as_tensor(ids, dtype=torch.long) - offset
    return _check_codes(codes, count, f"{kind} token ids")
