"""A synthetic multimodal token dataset: learnable structure with no media and no files.

A seed fixes a small "world" of concepts (``"red circle"``, ...), each with its own image codes and
speech codes. Samples pair one modality of a concept with another, one per task of the registry
(:data:`omnidiff.data.tokens.sequences.TASKS`: captioning, VQA, text-to-image, ASR, TTS,
speech-to-image, spoken VQA, text chat), laid out by the same ChatML :class:`SequenceBuilder` as
real data, so a model can only lower the loss by learning the cross-modal mapping. Sample ``i``
depends only on ``(seed, i)``, so a stream resumes exactly from an index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import product

import torch

from omnidiff.data.tokens.packing import TokenSample
from omnidiff.data.tokens.sequences import TASKS, SequenceBuilder
from omnidiff.data.tokens.vocab import TextTokenizer, UnifiedVocab

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "moon")


class SyntheticMultimodal:
    """Deterministic concept world + sample generator."""

    def __init__(self, vocab: UnifiedVocab, tokenizer: TextTokenizer, seed: int = 0,
                 image_codes_per_concept: int = 16, speech_codes_per_concept: int = 12,
                 speech_feature_size: int | None = None) -> None:
        """``speech_feature_size``: heard speech (prompts) as ``[frames, size]`` features per
        concept (continuous speech input) instead of codes; spoken answers stay codes."""
        self.vocab = vocab
        self.seed = seed
        self.builder = SequenceBuilder(vocab, tokenizer)
        world = torch.Generator().manual_seed(seed)
        self.concepts = list(product(COLOURS, SHAPES))
        count = len(self.concepts)
        self.image_codes = torch.randint(0, vocab.image_codebook_size,
                                         (count, image_codes_per_concept), generator=world)
        self.speech_codes = torch.randint(0, vocab.speech_codebook_size,
                                          (count, speech_codes_per_concept), generator=world)
        self.speech_features = (None if speech_feature_size is None else torch.randn(
            count, speech_codes_per_concept // 2, speech_feature_size, generator=world))
        self._tasks = self._task_builders()

    def _task_builders(self) -> dict[str, Callable[[int], TokenSample]]:
        """How each registered task is made from one concept."""
        b = self.builder

        def caption(c: int) -> str:
            return " ".join(self.concepts[c])

        def image(c: int) -> torch.Tensor:
            return self.image_codes[c]

        def speech(c: int) -> torch.Tensor:
            return self.speech_codes[c]

        def heard(c: int) -> torch.Tensor:
            return speech(c) if self.speech_features is None else self.speech_features[c]

        builders = {
            "captioning": lambda c: b.captioning("Describe the image.", caption(c), image(c)),
            "vqa": lambda c: b.captioning(f"What colour is the {self.concepts[c][1]}?",
                                          self.concepts[c][0], image(c), task="vqa"),
            "text_to_image": lambda c: b.text_to_image(caption(c), image(c)),
            "asr": lambda c: b.asr(caption(c), heard(c)),
            "tts": lambda c: b.tts(caption(c), speech(c)),
            "speech_to_image": lambda c: b.speech_to_image(heard(c), image(c)),
            "spoken_vqa": lambda c: b.spoken_vqa(heard(c), image(c), caption(c), speech(c)),
            "text": lambda c: b.chat([(f"Which colour is the {caption(c)}?",
                                       self.concepts[c][0])]),
        }
        if set(builders) != set(TASKS):
            raise RuntimeError(f"synthetic tasks {sorted(builders)} differ from the registry")
        return builders

    def sample(self, index: int) -> TokenSample:
        """Sample ``index`` of the stream (a pure function of the seed and the index)."""
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        task = TASKS[int(torch.randint(len(TASKS), (1,), generator=rng))]
        concept = int(torch.randint(len(self.concepts), (1,), generator=rng))
        return self._tasks[task](concept)

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
