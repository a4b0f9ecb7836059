"""Masked-diffusion sampling: one sampler (:mod:`.sampler`) over any model form (:mod:`.models`),
its rules (:mod:`.rules`), task prompts and answers (:mod:`.tasks`) and media I/O (:mod:`.media`).

Typical use with an HF folder or a checkpoint::

    loaded = load_model("runs/tiny")                       # or an HF folder
    vocab, tokenizer = build_vocab(loaded.config.data)
    prompt = TaskPrompts(vocab, tokenizer).text("Which colour is the red circle?", length=16)
    tokens = generate(hf_logits_fn(loaded.model), [prompt.request],
                      SamplerConfig(label_shift=loaded.label_shift),
                      mask_id=vocab.mask_id, vocab_size=vocab.size)
"""

from omnidiff.platform.sampling.models import (
    LoadedModel, hf_logits_fn, load_model, megatron_logits_fn, tp_sync)
from omnidiff.platform.sampling.sampler import (
    GenerationRequest, LogitsFn, SamplerConfig, generate, pad_rows)
from omnidiff.platform.sampling.tasks import TASKS, TaskPrompt, TaskPrompts, request_from_sample

__all__ = ["TASKS", "GenerationRequest", "LoadedModel", "LogitsFn", "SamplerConfig", "TaskPrompt",
           "TaskPrompts", "generate", "hf_logits_fn", "load_model", "megatron_logits_fn",
           "pad_rows", "request_from_sample", "tp_sync"]
