"""Held-out evaluation of a model given as a ``logits_fn``: metrics plus sample artefacts.

* every task: masked-token accuracy from one noised forward (the training noising, seeded; no
  sampling): ``<task>/masked_accuracy`` and the overall ``masked_accuracy``; for tasks with an
  image or speech input, the same with another sample's input (the chance level of a model
  that ignores its input): ``<task>/masked_accuracy_blind`` and ``<task>/input_gain``;
* text answers (captioning, VQA, ASR, text chat): sampled with the platform sampler, compared with
  the reference after lower-casing and collapsing whitespace: ``<task>/exact_match`` and the
  corpus word error rate ``<task>/wer`` (``jiwer``); captions of the demo's scenes are also
  scored on what they must read from the image, the first colour and shape word:
  ``captioning/color_accuracy`` and ``captioning/shape_accuracy`` (over references naming one;
  chance 1/8 and 1/5);
* images (text-to-image, speech-to-image): ``<task>/code_accuracy`` (generated vs reference code
  at each position) and ``<task>/psnr`` between the decoded generated and decoded reference codes.
  PSNR rather than SSIM: it is defined for the demo's 32-pixel images (SSIM's 7x7 windows cover a
  fifth of such an image), needs no choice of window or constants, and comparing with the decoded
  reference leaves the tokenizer's own reconstruction error out; identical images score
  :data:`PSNR_CEILING`. Prompts captioning a demo scene are also scored on colour: the palette
  colour most of a generated image's shape pixels have is one the caption names
  (``text_to_image/color_accuracy``; ``_reference`` the same for the decoded reference codes,
  the image tokenizer's ceiling; ``_blind`` against another prompt's caption, the level of a
  model that ignores the prompt). Images are sampled with ``EvalConfig.image_sampler`` (as
  ``omnidiff sample`` does), text with ``sampler``. A grid PNG (generated | reference per row) is
  an artefact;
* TTS: generated speech codes are transcribed by the same model (the ASR prompt) and scored
  against the input text: ``tts/roundtrip_wer``; decoded WAVs are artefacts.
  Spoken VQA (mixed text and speech answers) gets the masked-token accuracy only.

Text answers get the reference's length plus ``text_slack`` masks (the model ends them with
``<|im_end|>`` and end-of-text pads); TTS answers get the release's 3.5 x text tokens.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import jiwer
import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio

from omnidiff.data.config import DiffusionConfig
from omnidiff.data.demo.scenes import Scene, caption_attributes, image_colors, parse_caption
from omnidiff.data.tokenizers.base import ImageTokenizer, SpeechTokenizer
from omnidiff.data.tokens.noising import noise_batch
from omnidiff.data.tokens.packing import TokenSample, collate_rows
from omnidiff.data.tokens.sequences import TEXT_TO_IMAGE_PROMPT, TTS_PROMPT
from omnidiff.data.tokens.vocab import TextTokenizer, UnifiedVocab
from omnidiff.platform.config import EvalConfig, SamplerConfig
from omnidiff.platform.objective import scored_positions
from omnidiff.platform.sampling import media
from omnidiff.platform.sampling.sampler import GenerationRequest, LogitsFn, SyncFn, generate
from omnidiff.platform.sampling.tasks import (
    TaskPrompts, answer_image_codes, answer_speech_codes, answer_text, prompt_end,
    request_from_sample, split_sample)

Tensor = torch.Tensor
TEXT_TASKS = ("captioning", "vqa", "asr", "text")
IMAGE_TASKS = ("text_to_image", "speech_to_image")
PSNR_CEILING = 100.0  # dB, reported for identical images (PSNR is infinite there)
IMAGE_RANGE = 2.0  # images are in [-1, 1]
GRID_CELL = 128  # pixels: sample grids enlarge small (demo) images to be looked at


@dataclass
class EvalReport:
    """Flat metrics (``task/metric``) and artefacts by file name (PNG and WAV contents)."""

    metrics: dict[str, float] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)
    audio: dict[str, bytes] = field(default_factory=dict)


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


class _Evaluator:
    """One evaluation pass; holds what every metric needs."""

    def __init__(self, logits_fn: LogitsFn, vocab: UnifiedVocab, tokenizer: TextTokenizer,
                 image_tokenizer: ImageTokenizer | None, speech_tokenizer: SpeechTokenizer | None,
                 config: EvalConfig, sync: SyncFn | None) -> None:
        self.logits_fn, self.vocab, self.tokenizer, self.sync = logits_fn, vocab, tokenizer, sync
        self.image_tokenizer, self.speech_tokenizer = image_tokenizer, speech_tokenizer
        self.config = config
        self.prompts = TaskPrompts(vocab, tokenizer)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.report = EvalReport()

    def generate(self, requests: list[GenerationRequest],
                 sampler: SamplerConfig | None = None) -> list[Tensor]:
        """Answers (the generated regions), batched; ``sampler`` defaults to the text one."""
        out = []
        for chunk in _chunks(requests, self.config.batch_size):
            rows = generate(self.logits_fn, chunk, sampler or self.config.sampler,
                            mask_id=self.vocab.mask_id,
                            vocab_size=self.vocab.size, generator=self.generator, sync=self.sync)
            out += [row[r.start:] for row, r in zip(rows, chunk)]
        return out

    def reference(self, sample: TokenSample) -> Tensor:
        return split_sample(sample)[1]

    # --- masked-token accuracy ---------------------------------------------------------------
    @torch.no_grad()
    def masked_accuracy(self, samples: Sequence[TokenSample]) -> None:
        hits, counts = self._masked_hits(samples)
        for task in counts:
            self.report.metrics[f"{task}/masked_accuracy"] = hits[task] / counts[task]
        if counts:
            self.report.metrics["masked_accuracy"] = sum(hits.values()) / sum(counts.values())

    @torch.no_grad()
    def input_gain(self, samples: Sequence[TokenSample]) -> None:
        """The chance level of tasks with a media input: masked-token accuracy with each
        prompt's media codes taken from another held-out sample of the task (same code count,
        so the same positions are masked as in the run with the sample's own input, which is
        repeated on the same samples). ``<task>/input_gain`` = own-input minus blind accuracy:
        what the model takes from what it is shown or told; about 0 means it ignores it."""
        pairs = self._blind_pairs(samples)
        if not pairs:
            return
        own, counts = self._masked_hits([own for own, _ in pairs])
        blind, _ = self._masked_hits([blind for _, blind in pairs])
        for task in counts:
            self.report.metrics[f"{task}/masked_accuracy_blind"] = blind[task] / counts[task]
            self.report.metrics[f"{task}/input_gain"] = (own[task] - blind[task]) / counts[task]

    def _input_media(self, sample: TokenSample) -> Tensor:
        """Where the sample's prompt holds image or speech codes (what the model is shown)."""
        tokens = sample.tokens
        media = self.vocab.is_image(tokens) | self.vocab.is_speech(tokens)
        return media & (torch.arange(len(tokens)) < prompt_end(sample))

    def _blind_pairs(self, samples: Sequence[TokenSample]) -> list[tuple[TokenSample, TokenSample]]:
        """(sample, the sample with another same-task sample's input codes of the same count)
        for every sample with such a partner (continuous speech input: none)."""
        media = [self._input_media(sample) for sample in samples]
        pairs = []
        for sample, mine in zip(samples, media):
            if not mine.any() or sample.speech_features is not None:
                continue
            for other, theirs in zip(samples, media):
                if (other.task == sample.task and int(theirs.sum()) == int(mine.sum())
                        and not torch.equal(other.tokens[theirs], sample.tokens[mine])):
                    tokens = sample.tokens.clone()
                    tokens[mine] = other.tokens[theirs]
                    pairs.append((sample, replace(sample, tokens=tokens)))
                    break
        return pairs

    def _masked_hits(self, samples: Sequence[TokenSample]) -> tuple[Counter, Counter]:
        noising = DiffusionConfig(tail_pad=False)
        generator = torch.Generator().manual_seed(self.config.seed)
        hits, counts = Counter(), Counter()
        for chunk in _chunks(samples, self.config.batch_size):
            batch = collate_rows([[s] for s in chunk], max(len(s) for s in chunk), self.vocab.eos_id)
            noised = noise_batch(batch, noising, self.vocab.mask_id, generator)
            rows, cols = scored_positions(noised, self.config.sampler.label_shift)
            logits = self.logits_fn(noised.input_ids, noised.position_ids, noised.segment_ids)
            right = logits[rows, cols, :self.vocab.size].argmax(-1) == noised.labels[noised.loss_mask]
            for row, hit in zip(rows.tolist(), right.tolist()):
                hits[chunk[row].task] += hit
                counts[chunk[row].task] += 1
        return hits, counts

    # --- text answers ------------------------------------------------------------------------
    def text_answers(self, task: str, samples: Sequence[TokenSample]) -> None:
        references = [self.reference(s) for s in samples]
        requests = [request_from_sample(s, self.vocab, len(ref) + self.config.text_slack)
                    for s, ref in zip(samples, references)]
        hypotheses = [self.text(a) for a in self.generate(requests)]
        truths = [self.text(r) for r in references]
        self.report.metrics[f"{task}/exact_match"] = sum(
            h == r for h, r in zip(hypotheses, truths)) / len(truths)
        self.report.metrics[f"{task}/wer"] = jiwer.wer(truths, hypotheses)
        if task == "captioning":
            self.scene_attributes(task, truths, hypotheses)

    def scene_attributes(self, task: str, truths: list[str], hypotheses: list[str]) -> None:
        hits, counts = Counter(), Counter()
        for truth, hypothesis in zip(truths, hypotheses):
            said = caption_attributes(hypothesis)
            for name, word in caption_attributes(truth).items():
                counts[name] += 1
                hits[name] += said.get(name) == word
        for name in counts:
            self.report.metrics[f"{task}/{name}_accuracy"] = hits[name] / counts[name]

    def scene_colors(self, task: str, scenes: list[Scene | None],
                     drawn: list[tuple[Tensor, Tensor]]) -> None:
        """For prompts that caption a demo scene: is the colour most of a generated image's
        shape pixels have one the caption names (``color_accuracy``)? The same for the decoded
        reference codes (``color_accuracy_reference``: what the image tokenizer lets through)
        and for each generated image against another prompt's caption (``color_accuracy_blind``:
        the level of a model that ignores the prompt, as ``input_gain`` for inputs)."""
        named = [(i, {item.color for item in scene.items}) for i, scene in enumerate(scenes)
                 if scene is not None]
        if not named:
            return
        main = [_main_color(image) for image, _ in drawn]
        scores = {
            "color_accuracy": [main[i] in colors for i, colors in named],
            "color_accuracy_reference": [_main_color(drawn[i][1]) in colors for i, colors in named],
            "color_accuracy_blind": [main[named[k - 1][0]] in colors
                                     for k, (_, colors) in enumerate(named)],
        }
        for name, hits in scores.items():
            self.report.metrics[f"{task}/{name}"] = sum(hits) / len(hits)

    def text(self, answer: Tensor) -> str:
        return _normalise(answer_text(answer, self.vocab, self.tokenizer))

    # --- images ------------------------------------------------------------------------------
    def images(self, task: str, samples: Sequence[TokenSample]) -> None:
        references = [self.reference(s) for s in samples]
        answers = self.generate([request_from_sample(s, self.vocab) for s in samples],
                                self.config.image_sampler)
        right = total = 0
        psnrs, grid, drawn = [], [], []
        for reference, answer in zip(references, answers):
            codes = self.vocab.is_image(reference)
            right += int((answer[codes] == reference[codes]).sum())
            total += int(codes.sum())
            if self.image_tokenizer is None:
                continue
            truth = media.decode_image(self.vocab.image_codes(reference[codes]), self.image_tokenizer)
            made = answer_image_codes(answer, self.vocab, int(codes.sum()))
            image = torch.zeros_like(truth) if made is None else media.decode_image(
                made, self.image_tokenizer)
            with np.errstate(divide="ignore"):  # identical images: infinite, then the ceiling
                psnr = peak_signal_noise_ratio(truth.numpy(), image.numpy(), data_range=IMAGE_RANGE)
            psnrs.append(min(float(psnr), PSNR_CEILING))
            drawn.append((image, truth))
            if len(grid) < self.config.max_artifacts:
                grid.append([image, truth])
        self.report.metrics[f"{task}/code_accuracy"] = right / max(total, 1)
        if psnrs:
            self.report.metrics[f"{task}/psnr"] = sum(psnrs) / len(psnrs)
        if task == "text_to_image" and drawn:
            self.scene_colors(task, [parse_caption(self.instructed_text(s, TEXT_TO_IMAGE_PROMPT))
                                     for s in samples], drawn)
        if grid:
            self.report.images[f"{task}_grid.png"] = media.png_bytes(
                media.image_grid(grid, min_size=GRID_CELL))

    # --- text to speech, round trip ------------------------------------------------------------
    def tts_roundtrip(self, samples: Sequence[TokenSample]) -> None:
        texts = [self.instructed_text(s, TTS_PROMPT) for s in samples]
        speech = [answer_speech_codes(a, self.vocab)
                  for a in self.generate([self.prompts.tts(t).request for t in texts])]
        spoken = [i for i, codes in enumerate(speech) if len(codes)]
        heard = [""] * len(texts)
        requests = [self.prompts.asr(speech[i], len(self.tokenizer.encode(texts[i])) + 2
                                     + self.config.text_slack).request for i in spoken]
        for i, answer in zip(spoken, self.generate(requests)):
            heard[i] = self.text(answer)
        self.report.metrics["tts/roundtrip_wer"] = jiwer.wer([_normalise(t) for t in texts], heard)
        if self.speech_tokenizer is not None:
            rate = self.speech_tokenizer.decoded_sample_rate
            for i in spoken[:self.config.max_artifacts]:
                wave = media.decode_speech(speech[i], self.speech_tokenizer)
                self.report.audio[f"tts_{i}.wav"] = media.wav_bytes(wave, rate)

    def instructed_text(self, sample: TokenSample, instruction: str) -> str:
        """The user turn's text after ``instruction`` (what to speak, what to draw)."""
        prompt = self.tokenizer.decode(sample.tokens[:prompt_end(sample)].tolist())
        found = re.search(re.escape(instruction) + r"\n(.*?)<\|im_end\|>", prompt, re.DOTALL)
        if not found:
            raise ValueError(f"a {sample.task} sample without {instruction!r} in its prompt")
        return found.group(1)


def _main_color(image: Tensor) -> str | None:
    """The palette colour of most of a decoded ``[3, H, W]`` image's shape pixels."""
    counts = image_colors(media.rgb_pixels(image)).most_common(1)
    return counts[0][0] if counts else None


def evaluate(logits_fn: LogitsFn, samples: Sequence[TokenSample], vocab: UnifiedVocab,
             tokenizer: TextTokenizer, *, image_tokenizer: ImageTokenizer | None = None,
             speech_tokenizer: SpeechTokenizer | None = None,
             config: EvalConfig | None = None, sync: SyncFn | None = None) -> EvalReport:
    """Every metric the samples' tasks allow (see the module docstring), with artefacts.

    ``sync``: makes the ranks of a tensor-parallel model agree on sampled tokens (``tp_sync``).
    """
    evaluator = _Evaluator(logits_fn, vocab, tokenizer, image_tokenizer, speech_tokenizer,
                           config or EvalConfig(), sync)
    evaluator.masked_accuracy(samples)
    evaluator.input_gain(samples)
    by_task: dict[str, list[TokenSample]] = defaultdict(list)
    for sample in samples:
        by_task[sample.task].append(sample)
    for task, group in by_task.items():
        if task in TEXT_TASKS:
            evaluator.text_answers(task, group)
        elif task in IMAGE_TASKS:
            evaluator.images(task, group)
        elif task == "tts":
            evaluator.tts_roundtrip(group)
    return evaluator.report


def save_artifacts(report: EvalReport, directory: str | Path) -> list[Path]:
    """``metrics.json``, ``images/*.png`` and ``audio/*.wav`` under ``directory``."""
    directory = Path(directory)
    written = []
    for sub, files in (("images", report.images), ("audio", report.audio)):
        for name, data in files.items():
            path = directory / sub / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append(path)
    directory.mkdir(parents=True, exist_ok=True)
    metrics = directory / "metrics.json"
    metrics.write_text(json.dumps(report.metrics, indent=2, sort_keys=True))
    return [metrics, *written]
