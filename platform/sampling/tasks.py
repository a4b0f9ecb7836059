"""Task prompts for sampling, laid out by the training ChatML builders, and reading answers back.

A prompt is exactly the training sequence of the task up to the answer: the same
:class:`~omnidiff.data.tokens.sequences.SequenceBuilder` builds the task's conversation (with a
stand-in answer) and everything before its first target token is kept, i.e. the system / user
turns and the ``<|im_start|>assistant\\n`` header. The answer region is then:

* images (text-to-image, speech-to-image): the training target layout with its codes masked,
  ``<|begin_of_image|> [mask] x N <|end_of_image|> <|im_end|>\\n``: a span of the right length;
* text and speech: ``length`` masks, the model writing ``<|im_end|>`` and end-of-text pads itself
  (tail-pad training); a spoken answer gets ``<|begin_of_audio|>`` pre-filled (at 0 for TTS, where
  the answer starts with it, and at 0.2 of the span for spoken VQA, after the text answer).

Lengths and settings follow the release (``tools/inference.py``, ``evaluate_asr.py``,
``evaluate_libritts.py``): ASR answers get 0.2 x prompt length and TTS answers 3.5 x text
tokens, both with half as many steps; image tasks use the position penalty 2.0 (and temperature
sampling, :data:`~omnidiff.platform.config.IMAGE_SAMPLING`); speech-to-image
uses guidance 2.0 against the prompt with the speech removed, text-to-image's unconditional
prompt replaces the caption by random text tokens of the same length.

``restrict_modality`` (off by default: the release does not restrict) limits what the masks of
an image answer may become to image codes, and gives a TTS answer the fixed layout
``<|begin_of_audio|> [mask] x length <|end_of_audio|> <|im_end|>\n`` with speech codes only, so a
barely trained model still yields decodable media.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from omnidiff.data.tokens.packing import TokenSample
from omnidiff.data.tokens.sequences import SPEECH_TO_IMAGE_SYSTEM, IMAGE_PLACEHOLDER, SequenceBuilder
from omnidiff.data.tokens.vocab import TextTokenizer, UnifiedVocab
from omnidiff.platform.config import IMAGE_SAMPLING
from omnidiff.platform.sampling import rules
from omnidiff.platform.sampling.sampler import GenerationRequest

Tensor = torch.Tensor

# CLI task names -> the data registry's task names (omnidiff.data.tokens.sequences.TASKS)
TASKS = {"t2i": "text_to_image", "s2i": "speech_to_image", "caption": "captioning", "asr": "asr",
         "tts": "tts", "svqa": "spoken_vqa", "text": "text"}
IMAGE_TASKS = ("text_to_image", "speech_to_image")
ASR_LENGTH_FACTOR = 0.2  # answer tokens per prompt token
TTS_LENGTH_FACTOR = 3.5  # speech tokens per text token
ADAPTIVE_STEP_RATIO = 2  # adaptive-length tasks take length / 2 steps
SPOKEN_ANSWER_BOA = 0.2  # <|begin_of_audio|> at this fraction of a spoken VQA answer
STAND_IN = "x"  # a placeholder answer: only the prompt before it is used


@dataclass
class TaskPrompt:
    """A request plus the sampler settings the release uses for the task."""

    request: GenerationRequest
    task: str
    settings: dict[str, Any] = field(default_factory=dict)


def prompt_end(sample: TokenSample) -> int:
    """Index of the first target token (the end of the prompt)."""
    targets = sample.target_mask.nonzero()
    if not len(targets):
        raise ValueError(f"{sample.task or 'sample'}: no target tokens, nothing to generate")
    return int(targets[0, 0])


def split_sample(sample: TokenSample) -> tuple[int, Tensor]:
    """``(prompt end, target)``: the answer without appended end-of-text tail pads."""
    start = prompt_end(sample)
    return start, sample.tokens[start:][~sample.tail_pad_mask[start:]]


def request_from_sample(sample: TokenSample, vocab: UnifiedVocab, length: int | None = None,
                        steps: int | None = None, restrict_modality: bool = False
                        ) -> GenerationRequest:
    """The sample's prompt with its answer to generate: a target holding image codes keeps its
    layout with the codes masked (restricted to image codes if asked); any other gets
    ``length`` masks (default: its own length)."""
    start, target = split_sample(sample)
    if bool(vocab.is_image(target).any()):
        return media_request(sample, vocab, vocab.is_image, steps, restrict_modality)
    answer = torch.full((length or len(target),), vocab.mask_id, dtype=torch.long)
    return GenerationRequest(torch.cat([sample.tokens[:start], answer]), start, steps=steps)


def media_request(sample: TokenSample, vocab: UnifiedVocab, is_code, steps: int | None,
                  restrict: bool) -> GenerationRequest:
    """The sample's target layout with its codes (``is_code(ids)``) masked; with ``restrict``
    the masks may only become such codes."""
    start, target = split_sample(sample)
    answer = torch.where(is_code(target), vocab.mask_id, target)
    allowed = is_code(torch.arange(vocab.size)) if restrict else None
    return GenerationRequest(torch.cat([sample.tokens[:start], answer]), start, steps=steps,
                             allowed=allowed)


class TaskPrompts:
    """Sampling prompts of every task, from the training builders."""

    def __init__(self, vocab: UnifiedVocab, tokenizer: TextTokenizer,
                 restrict_modality: bool = False) -> None:
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.builder = SequenceBuilder(vocab, tokenizer)
        self.restrict = restrict_modality

    def _masks(self, sample: TokenSample, length: int, steps: int | None = None,
               prefill: dict[int, int] | None = None) -> GenerationRequest:
        request = request_from_sample(sample, self.vocab, max(1, length), steps)
        for offset, token in (prefill or {}).items():
            request.answer[offset] = token
        return request

    def _prompt(self, sample: TokenSample) -> Tensor:
        return sample.tokens[:prompt_end(sample)]

    def text(self, prompt: str, length: int = 64) -> TaskPrompt:
        sample = self.builder.chat([(prompt, STAND_IN)])
        return TaskPrompt(self._masks(sample, length), "text")

    def caption(self, image_codes: Tensor, question: str = "Describe the image.",
                length: int = 64) -> TaskPrompt:
        sample = self.builder.captioning(question, STAND_IN, image_codes)
        return TaskPrompt(self._masks(sample, length), "captioning")

    def asr(self, speech_codes: Tensor, length: int | None = None) -> TaskPrompt:
        sample = self.builder.asr(STAND_IN, speech_codes)
        length = length or int(len(self._prompt(sample)) * ASR_LENGTH_FACTOR)
        return TaskPrompt(self._masks(sample, length, max(1, length // ADAPTIVE_STEP_RATIO)), "asr")

    def tts(self, text: str, length: int | None = None) -> TaskPrompt:
        length = max(2, length or int(len(self.tokenizer.encode(text)) * TTS_LENGTH_FACTOR))
        steps = max(1, length // ADAPTIVE_STEP_RATIO)
        if self.restrict:
            sample = self.builder.tts(text, torch.zeros(length, dtype=torch.long))
            return TaskPrompt(media_request(sample, self.vocab, self.vocab.is_speech, steps, True),
                              "tts")
        request = self._masks(self.builder.tts(text, [0]), length, steps,
                              {0: self.vocab.begin_of_audio_id})
        return TaskPrompt(request, "tts")

    def spoken_vqa(self, speech_codes: Tensor, image_codes: Tensor, length: int = 128) -> TaskPrompt:
        sample = self.builder.spoken_vqa(speech_codes, image_codes, STAND_IN, [0])
        boa = rules.boa_offset(max(1, length), SPOKEN_ANSWER_BOA)
        return TaskPrompt(self._masks(sample, length, prefill={boa: self.vocab.begin_of_audio_id}),
                          "spoken_vqa")

    def text_to_image(self, caption: str, num_codes: int,
                      generator: torch.Generator | None = None) -> TaskPrompt:
        blank = torch.zeros(num_codes, dtype=torch.long)
        request = request_from_sample(self.builder.text_to_image(caption, blank), self.vocab,
                                      steps=num_codes, restrict_modality=self.restrict)
        empty = self._prompt(self.builder.text_to_image("", blank))
        request.uncond_prompt = self._random_middle(request.tokens[:request.start], empty, generator)
        return TaskPrompt(request, "text_to_image", dict(IMAGE_SAMPLING))

    def speech_to_image(self, speech_codes: Tensor, num_codes: int) -> TaskPrompt:
        blank = torch.zeros(num_codes, dtype=torch.long)
        request = request_from_sample(self.builder.speech_to_image(speech_codes, blank),
                                      self.vocab, steps=num_codes, restrict_modality=self.restrict)
        silent = self.builder.build_from_messages(
            [{"role": "system", "content": SPEECH_TO_IMAGE_SYSTEM}, {"role": "user", "content": ""},
             {"role": "assistant", "content": IMAGE_PLACEHOLDER}], [blank])
        request.uncond_prompt = self._prompt(silent)
        return TaskPrompt(request, "speech_to_image", {**IMAGE_SAMPLING, "guidance": 2.0})

    def _random_middle(self, prompt: Tensor, empty: Tensor,
                       generator: torch.Generator | None) -> Tensor:
        """``prompt`` with the part ``empty`` lacks (the caption) replaced by random plain-text
        ids of the same length (the release's unconditional text-to-image prompt)."""
        head = 0
        while head < len(empty) and prompt[head] == empty[head]:
            head += 1
        tail = 0
        while tail < len(empty) - head and prompt[-1 - tail] == empty[-1 - tail]:
            tail += 1
        text_ids = torch.ones(self.vocab.text_size, dtype=torch.bool)
        text_ids[list(self.vocab.chat_special_ids.values())] = False
        pool = text_ids.nonzero()[:, 0]
        middle = len(prompt) - head - tail
        picks = pool[torch.randint(len(pool), (middle,), generator=generator)]
        return torch.cat([prompt[:head], picks, prompt[len(prompt) - tail:]])


# --- reading answers ---------------------------------------------------------------------------
def answer_text(answer: Tensor, vocab: UnifiedVocab, tokenizer: TextTokenizer) -> str:
    """The text of an answer: up to the first ``<|im_end|>`` / end-of-text, text ids only."""
    stops = (answer == vocab.im_end_id) | (answer == vocab.eos_id)
    end = int(stops.nonzero()[0, 0]) if bool(stops.any()) else len(answer)
    ids = [int(i) for i in answer[:end] if int(i) < vocab.text_size and int(i) != vocab.mask_id]
    return tokenizer.decode(ids).strip()


def answer_image_codes(answer: Tensor, vocab: UnifiedVocab, count: int) -> Tensor | None:
    """The first ``count`` image codes of an answer; a short answer repeats its last code (as the
    release does); None when it holds no image code."""
    codes = vocab.image_codes(answer[vocab.is_image(answer)])
    if not len(codes):
        return None
    return torch.cat([codes, codes[-1:].expand(max(0, count - len(codes)))])[:count]


def answer_speech_codes(answer: Tensor, vocab: UnifiedVocab) -> Tensor:
    """Every speech code of an answer, in order (empty when there is none)."""
    return vocab.speech_codes(answer[vocab.is_speech(answer)])
