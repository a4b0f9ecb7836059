"""Held-out evaluation while a run trains: every ``evaluation.interval`` steps and at its end.

The held-out set is read once, when the run starts: for each source of ``evaluation.mixture``
with a ratio in the run's ``data.stage``, its first ``samples_per_task`` samples (media decoded
and tokenised exactly as training data is). Each evaluation samples the live model (whole on
every rank: PP = 1; TP ranks agree through :func:`tp_sync`), scores it with
:func:`~omnidiff.platform.evaluation.evaluate`, and leaves ``<output_dir>/eval/step_N/``
(``metrics.json``, sample grid PNGs, WAVs); the trainer logs the metrics as ``eval/...`` and the
folder as MLflow artefacts.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from omnidiff.data.streams.media_tokenize import load_tokenizers
from omnidiff.data.streams.sources import build_sample_source, stage_sources
from omnidiff.data.tokens.packing import TokenSample
from omnidiff.data.tokens.vocab import TextTokenizer, UnifiedVocab
from omnidiff.platform.config import RunConfig
from omnidiff.platform.evaluation import evaluate, save_artifacts
from omnidiff.platform.sampling.models import megatron_logits_fn, tp_sync

log = logging.getLogger("omnidiff.eval")
EVAL_DIR = "eval"


def held_out_samples(cfg: RunConfig, vocab: UnifiedVocab,
                     tokenizer: TextTokenizer) -> list[TokenSample]:
    """The first ``samples_per_task`` samples of every held-out source the run's stage uses."""
    evaluation = cfg.evaluation
    mixture = cfg.data.model_copy(update={"mixture": evaluation.mixture, "paths": []})
    samples: list[TokenSample] = []
    for specs in stage_sources(mixture)[0].values():
        one_source = cfg.data.model_copy(update={"source": "shards", "mixture": None,
                                                 "stage": None, "paths": specs})
        stream = build_sample_source(one_source, evaluation.seed, vocab, tokenizer)
        samples += itertools.islice(stream, evaluation.samples_per_task)
    return samples


class HeldOutEvaluation:
    """What the trainer calls: :meth:`due` after each step, :meth:`run` when it is."""

    def __init__(self, cfg: RunConfig, vocab: UnifiedVocab, tokenizer: TextTokenizer) -> None:
        trained = {"label_shift": cfg.diffusion.label_shift}  # sample as the model was trained
        self.config = cfg.evaluation.model_copy(update={
            "sampler": cfg.evaluation.sampler.model_copy(update=trained),
            "image_sampler": cfg.evaluation.image_sampler.model_copy(update=trained)})
        self.last_step = cfg.schedule.train_steps
        self.vocab, self.tokenizer = vocab, tokenizer
        self.samples = held_out_samples(cfg, vocab, tokenizer)
        self.image_tokenizer, self.speech_tokenizer = load_tokenizers(
            cfg.data.image_tokenizer, cfg.data.speech_tokenizer, vocab)
        log.info("held-out evaluation: %d samples from %s", len(self.samples),
                 cfg.evaluation.mixture)

    def due(self, step: int) -> bool:
        interval = self.config.interval
        return step == self.last_step or bool(interval and step % interval == 0)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, step: int, output_dir: Path,
            write: bool) -> tuple[dict[str, float], Path | None]:
        """``eval/...`` metrics of ``model`` at ``step``, and the folder of its artefacts
        (written by the rank with ``write``; None on the others)."""
        was_training = model.training
        model.eval()
        try:
            report = evaluate(megatron_logits_fn(model), self.samples, self.vocab,
                              self.tokenizer, image_tokenizer=self.image_tokenizer,
                              speech_tokenizer=self.speech_tokenizer, config=self.config,
                              sync=tp_sync())
        finally:
            model.train(was_training)
        folder = Path(output_dir) / EVAL_DIR / f"step_{step:08d}"
        if write:
            save_artifacts(report, folder)
        return {f"eval/{name}": value for name, value in report.metrics.items()}, \
            folder if write else None
