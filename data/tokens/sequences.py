"""Task sequence builders: chat messages + tokenised media -> one :class:`TokenSample`.

The layout is ChatML (REFERENCE §2): every turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.
Only assistant turns are targets, and only their ``content<|im_end|>\\n`` part (the
``<|im_start|>assistant\\n`` header is given, never predicted). Media enter the content through the
placeholders ``<image>`` and ``<speech>``; each is replaced, in order of appearance over the whole
conversation, by ``<|begin_of_image|> codes <|end_of_image|>`` or
``<|begin_of_audio|> codes <|end_of_audio|>``.

The per-task functions below make the messages of each task with the exact prompts of the
Omni-Diffusion release, so shards can store either ready messages or just the task's fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from omnidiff.data.tokens.packing import TokenSample
from omnidiff.data.tokens.tasks import TASKS
from omnidiff.data.tokens.vocab import CONTEXT_OF_AUDIO, TextTokenizer, UnifiedVocab

IMAGE_PLACEHOLDER = "<image>"
SPEECH_PLACEHOLDER = "<speech>"
ROLES = ("system", "user", "assistant")

TEXT_TO_IMAGE_PROMPT = "Generate an image based on the provided text description."
ASR_PROMPT = "Convert the speech to text."
TTS_PROMPT = "Convert the text to speech."
SPEECH_TO_IMAGE_SYSTEM = "Please generate an image based on the input audio."
SPOKEN_VQA_SYSTEM = "Please response the input audio based on the given image."

Message = Mapping[str, str]
Codes = torch.Tensor | Sequence[int]

_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(SPEECH_PLACEHOLDER)})")


class SampleError(ValueError):
    """A sample that cannot become a token sequence (bad messages or mismatched media)."""


# --- messages of each task (REFERENCE §2) ----------------------------------------------------
def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def captioning_messages(question: str, answer: str) -> list[dict[str, str]]:
    """Captioning and VQA share one layout: ``{question}\\n<image>`` -> text."""
    return _turns(("user", f"{question}\n{IMAGE_PLACEHOLDER}"), ("assistant", answer))


def text_to_image_messages(caption: str) -> list[dict[str, str]]:
    return _turns(("user", f"{TEXT_TO_IMAGE_PROMPT}\n{caption}"), ("assistant", IMAGE_PLACEHOLDER))


def asr_messages(transcript: str) -> list[dict[str, str]]:
    return _turns(("user", f"{ASR_PROMPT}\n{SPEECH_PLACEHOLDER}"), ("assistant", transcript))


def tts_messages(text: str) -> list[dict[str, str]]:
    return _turns(("user", f"{TTS_PROMPT}\n{text}"), ("assistant", SPEECH_PLACEHOLDER))


def speech_to_image_messages() -> list[dict[str, str]]:
    return _turns(("system", SPEECH_TO_IMAGE_SYSTEM), ("user", SPEECH_PLACEHOLDER),
                  ("assistant", IMAGE_PLACEHOLDER))


def spoken_vqa_messages(answer: str) -> list[dict[str, str]]:
    """Media order: question speech, image, answer speech (the answer is spoken after its text)."""
    return _turns(("system", SPOKEN_VQA_SYSTEM), ("user", f"{SPEECH_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}"),
                  ("assistant", f"{answer}\n{SPEECH_PLACEHOLDER}"))


def chat_messages(exchanges: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """Text-only chat: ``(user, assistant)`` exchanges, in order."""
    return [turn for user, assistant in exchanges
            for turn in _turns(("user", user), ("assistant", assistant))]


# --- messages -> tokens ----------------------------------------------------------------------
class SequenceBuilder:
    """Turns messages plus media codes into token ids and a target mask."""

    def __init__(self, vocab: UnifiedVocab, tokenizer: TextTokenizer) -> None:
        self.vocab = vocab
        self.tokenizer = tokenizer

    def build_from_messages(
        self, messages: Sequence[Message], images_codes: Sequence[Codes] = (),
        speech_codes: Sequence[Codes] = (), task: str = "",
    ) -> TokenSample:
        """Lay out a conversation; ``images_codes`` / ``speech_codes`` fill the placeholders in order.

        A speech entry is either codes (1-D ints: discrete speech tokens) or features (2-D float
        ``[frames, dim]``: continuous speech input, laid out as ``frames``
        ``<|context_of_audio|>`` placeholders whose embeddings the model replaces).
        """
        if not messages:
            raise SampleError("sample has no messages")
        media = {IMAGE_PLACEHOLDER: list(images_codes), SPEECH_PLACEHOLDER: list(speech_codes)}
        self._check_media_counts(messages, media)
        used = {IMAGE_PLACEHOLDER: 0, SPEECH_PLACEHOLDER: 0}
        pieces: list[torch.Tensor] = []
        targets: list[bool] = []
        has_target = False
        for index, message in enumerate(messages):
            role, content = self._check_message(index, message)
            header = self._text(f"{role}\n", prefix=[self.vocab.im_start_id])
            body = [*self._content(content, media, used),
                    self._text("\n", prefix=[self.vocab.im_end_id])]
            is_target = role == "assistant"
            has_target |= is_target
            pieces.append(header)
            targets.append(False)
            pieces.extend(body)
            targets.extend([is_target] * len(body))
        if not has_target:
            raise SampleError("sample has no assistant turn (nothing to train on)")
        tokens = torch.cat(pieces)
        target_mask = torch.cat([torch.full((len(p),), t, dtype=torch.bool)
                                 for p, t in zip(pieces, targets)])
        features = [torch.as_tensor(s, dtype=torch.float32) for s in speech_codes
                    if torch.is_tensor(s) and s.is_floating_point()]
        return TokenSample(tokens=tokens, target_mask=target_mask, task=task,
                           speech_features=torch.cat(features) if features else None)

    # --- per-task shortcuts -------------------------------------------------------------------
    def captioning(self, question: str, answer: str, image: Codes,
                   task: str = "captioning") -> TokenSample:
        return self.build_from_messages(captioning_messages(question, answer), [image], task=task)

    def text_to_image(self, caption: str, image: Codes) -> TokenSample:
        return self.build_from_messages(text_to_image_messages(caption), [image],
                                        task="text_to_image")

    def asr(self, transcript: str, speech: Codes) -> TokenSample:
        return self.build_from_messages(asr_messages(transcript), speech_codes=[speech], task="asr")

    def tts(self, text: str, speech: Codes) -> TokenSample:
        return self.build_from_messages(tts_messages(text), speech_codes=[speech], task="tts")

    def speech_to_image(self, speech: Codes, image: Codes) -> TokenSample:
        return self.build_from_messages(speech_to_image_messages(), [image], [speech],
                                        task="speech_to_image")

    def spoken_vqa(self, question_speech: Codes, image: Codes, answer: str,
                   answer_speech: Codes) -> TokenSample:
        return self.build_from_messages(spoken_vqa_messages(answer), [image],
                                        [question_speech, answer_speech], task="spoken_vqa")

    def chat(self, exchanges: Sequence[tuple[str, str]]) -> TokenSample:
        return self.build_from_messages(chat_messages(exchanges), task="text")

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _check_message(index: int, message: Message) -> tuple[str, str]:
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise SampleError(f"message {index}: unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise SampleError(f"message {index}: content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise SampleError(f"message {index}: empty assistant turn")
        return role, content

    @staticmethod
    def _check_media_counts(messages: Sequence[Message], media: dict[str, list]) -> None:
        found = {IMAGE_PLACEHOLDER: 0, SPEECH_PLACEHOLDER: 0}
        for message in messages:
            content = message.get("content")
            for placeholder in _PLACEHOLDER_RE.findall(content if isinstance(content, str) else ""):
                found[placeholder] += 1
        for placeholder, count in found.items():
            if count != len(media[placeholder]):
                raise SampleError(f"{count} {placeholder} placeholder(s) but "
                                  f"{len(media[placeholder])} {placeholder[1:-1]} code sequence(s)")

    def _text(self, text: str, prefix: Sequence[int] = ()) -> torch.Tensor:
        return torch.tensor([*prefix, *self.tokenizer.encode(text)], dtype=torch.long)

    def _content(self, content: str, media: dict[str, list], used: dict[str, int]):
        for piece in _PLACEHOLDER_RE.split(content):
            if piece in media:
                codes = media[piece][used[piece]]
                used[piece] += 1
                yield self._media(piece, codes, used[piece] - 1)
            elif piece:
                yield self._text(piece)

    def _media(self, placeholder: str, codes: Codes, index: int) -> torch.Tensor:
        vocab = self.vocab
        if torch.is_tensor(codes) and codes.is_floating_point():  # continuous speech features
            if placeholder != SPEECH_PLACEHOLDER or codes.dim() != 2 or not len(codes):
                raise SampleError(f"{placeholder[1:-1]} {index}: features must be a non-empty "
                                  "[frames, dim] float tensor for speech")
            context = vocab.special_id(CONTEXT_OF_AUDIO)
            return torch.tensor([vocab.begin_of_audio_id, *[context] * len(codes),
                                 vocab.end_of_audio_id])
        if placeholder == IMAGE_PLACEHOLDER:
            begin, end, shift = vocab.begin_of_image_id, vocab.end_of_image_id, vocab.image_ids
        else:
            begin, end, shift = vocab.begin_of_audio_id, vocab.end_of_audio_id, vocab.speech_ids
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() != 1 or codes.numel() == 0:
            raise SampleError(f"{placeholder[1:-1]} {index}: codes must be a non-empty 1-D sequence")
        try:
            ids = shift(codes)
        except ValueError as err:
            raise SampleError(f"{placeholder[1:-1]} {index}: {err}") from None
        return torch.cat([torch.tensor([begin]), ids, torch.tensor([end])])
