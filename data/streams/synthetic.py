"""A synthetic multimodal token dataset: learnable structure with no media and no files.

A seed fixes a small "world" of concepts (``"red circle"``, ...), each with its own image codes and
speech codes. Samples pair one modality of a concept with another, across the tasks of the
curriculum (text-to-image, captioning, ASR, TTS, speech-to-image), so a model can only lower
the loss by learning the cross-modal mapping. Samples use the ChatML frame of the real data in
compact form: ``<|im_start|> task-tag prompt <|im_end|> target``, with only the target scored.
Sample ``i`` depends only on ``(seed, i)``, so a stream resumes exactly from an index.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product

import torch

from omnidiff.data.tokens.packing import TokenSample
from omnidiff.data.tokens.vocab import TextTokenizer, UnifiedVocab

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "moon")
TASKS = ("text_to_image", "captioning", "asr", "tts", "speech_to_image")


class SyntheticMultimodal:
    """Deterministic concept world + sample generator."""

    def __init__(self, vocab: UnifiedVocab, tokenizer: TextTokenizer, seed: int = 0,
                 image_codes_per_concept: int = 16, speech_codes_per_concept: int = 12) -> None:
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.seed = seed
        world = torch.Generator().manual_seed(seed)
        self.captions = [f"{c} {s}" for c, s in product(COLOURS, SHAPES)]
        count = len(self.captions)
        self.image_codes = torch.randint(0, vocab.image_codebook_size,
                                         (count, image_codes_per_concept), generator=world)
        self.speech_codes = torch.randint(0, vocab.speech_codebook_size,
                                          (count, speech_codes_per_concept), generator=world)
        self._task_tags = {task: tokenizer.encode(task + ":") for task in TASKS}

    def _text(self, concept: int) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(self.captions[concept]), dtype=torch.long)

    def _image(self, concept: int) -> torch.Tensor:
        v = self.vocab
        return torch.cat([torch.tensor([v.begin_of_image_id]),
                          v.image_ids(self.image_codes[concept]),
                          torch.tensor([v.end_of_image_id])])

    def _speech(self, concept: int) -> torch.Tensor:
        v = self.vocab
        return torch.cat([torch.tensor([v.begin_of_audio_id]),
                          v.speech_ids(self.speech_codes[concept]),
                          torch.tensor([v.end_of_audio_id])])

    def sample(self, index: int) -> TokenSample:
        """Sample ``index`` of the stream (a pure function of the seed and the index)."""
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        task = TASKS[int(torch.randint(len(TASKS), (1,), generator=rng))]
        concept = int(torch.randint(len(self.captions), (1,), generator=rng))
        prompt, target = {
            "text_to_image": (self._text, self._image),
            "captioning": (self._image, self._text),
            "asr": (self._speech, self._text),
            "tts": (self._text, self._speech),
            "speech_to_image": (self._speech, self._image),
        }[task]
        head = torch.tensor([self.vocab.im_start_id, *self._task_tags[task]], dtype=torch.long)
        prompt_ids = torch.cat([head, prompt(concept), torch.tensor([self.vocab.im_end_id])])
        target_ids = target(concept)
        tokens = torch.cat([prompt_ids, target_ids])
        target_mask = torch.cat([torch.zeros(len(prompt_ids), dtype=torch.bool),
                                 torch.ones(len(target_ids), dtype=torch.bool)])
        return TokenSample(tokens, target_mask, task=task)

    def stream(self, start: int = 0, step: int = 1) -> Iterator[TokenSample]:
        """Samples ``start, start + step, ...`` (``step`` = data-parallel size for sharding)."""
        index = start
        while True:
            yield self.sample(index)
            index += step


class SyntheticSource:
    """Samples ``start, start + step, ...`` of a :class:`SyntheticMultimodal` world."""

    def __init__(self, dataset: SyntheticMultimodal, start: int = 0, step: int = 1) -> None:
        self.dataset = dataset
        self.index = start
        self.step = step

    def __next__(self) -> TokenSample:
        sample = self.dataset.sample(self.index)
        self.index += self.step
        return sample

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]
