"""The config sections the data path consumes: ``data`` (sources, tokenizers, packing, batch
sizes) and ``diffusion`` (the masked-diffusion noising and loss weighting, REFERENCE §3)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from omnidiff import ConfigSection


class DiffusionConfig(ConfigSection):
    """The masked-diffusion objective (REFERENCE §3): paper mode and released-code mode."""

    masking: Literal["per_token", "per_sequence"] = "per_token"
    eps: float = Field(1e-3, ge=0, lt=1)
    importance_weighting: bool = False  # LLaDA's 1/t weight; only meaningful per_sequence
    tail_pad: bool = True
    tail_pad_max: int = Field(16, ge=1)
    tail_pad_gamma: float = Field(0.6, ge=0, le=1)
    label_shift: bool = True  # Dream: the logit at position i predicts token i+1
    loss_normalization: Literal["token", "sample"] = "token"
    head_chunk_size: int = Field(1024, gt=0)  # masked positions per LM-head chunk
    # vocabulary rows per LM-head logits block; default by device: 1024 on CPU (cache-sized),
    # 8192 on CUDA (fewer, larger GEMMs; one fp32 [1024, 8192] block is 32 MiB)
    head_vocab_block: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_weighting(self) -> DiffusionConfig:
        if self.importance_weighting and self.masking != "per_sequence":
            raise ValueError("importance_weighting (1/t) needs masking: per_sequence")
        return self


class MediaTokenizerRef(ConfigSection):
    """A media tokenizer on local disk: ``kind`` as registered (see ``data/tokenizers``) + path."""

    kind: str
    path: str


class DataConfig(ConfigSection):
    """Where tokens come from and how they are packed.

    ``synthetic``: the built-in token world (no files). ``shards``: WebDataset media shards,
    decoded by DALI and tokenised on the fly. ``token_shards``: the output of ``omnidiff tokenize``.
    Shard sources are a ``mixture`` file plus the ``stage`` whose ratios are drawn, or ``paths``
    (shard specs read as one source).
    """

    source: Literal["synthetic", "shards", "token_shards"] = "synthetic"
    mixture: str | None = None
    stage: str | None = None
    paths: list[str] = Field(default_factory=list)
    text_tokenizer: str = "byte"  # "byte" (built-in) or a local Hugging Face tokenizer directory
    # byte tokenizer only: pad its text vocabulary to this many entries (151667 = Dream's), for
    # a full-size vocabulary (benchmarks, memory checks) without the Dream tokenizer files
    text_vocab_size: int | None = Field(None, ge=260)
    image_tokenizer: MediaTokenizerRef | None = None
    speech_tokenizer: MediaTokenizerRef | None = None
    image_codebook_size: int = Field(8192, gt=0)
    speech_codebook_size: int = Field(16384, gt=0)
    # speech the model hears (system / user turns): discrete codes, or continuous features of a
    # frozen SenseVoiceSmall encoder (speech_encoder: its folder) through a trained projector;
    # speech the model says (assistant turns) is always codes
    speech_input: Literal["codes", "continuous"] = "codes"
    speech_encoder: str | None = None
    speech_feature_size: int = Field(512, gt=0)  # the encoder's output size (SenseVoice: 512)
    image_size: int = Field(512, gt=0)  # input images (REFERENCE §2: 512 px -> 1024 codes)
    generated_image_size: int = Field(256, gt=0)  # images an assistant turn generates
    reader_batch_size: int = Field(16, gt=0)  # samples per DALI decode batch
    decode_budget_pixels: int = Field(64_000_000, gt=0)  # decoded pixels per decode call
    decode_budget_audio_seconds: float = Field(600.0, gt=0)  # decoded audio per decode call
    skip_bad_shards: bool = False  # leave unreadable shards out (counted) instead of refusing
    shuffle_buffer: int = Field(1024, gt=0)
    seq_length: int = Field(3072, gt=8)
    micro_batch_size: int = Field(1, gt=0)
    global_batch_size: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _check_text_vocab_size(self) -> DataConfig:
        if self.text_vocab_size is not None and self.text_tokenizer != "byte":
            raise ValueError("text_vocab_size pads the byte tokenizer only; a Hugging Face "
                             "tokenizer has its own size")
        return self

    @property
    def heard_feature_size(self) -> int | None:
        """The speech projector's input size when the model hears continuous speech, else None."""
        return self.speech_feature_size if self.speech_input == "continuous" else None

    @model_validator(mode="after")
    def _check_speech_input(self) -> DataConfig:
        if self.speech_input == "continuous":
            if self.source == "token_shards":
                raise ValueError("speech_input continuous reads media live (source shards or "
                                 "synthetic); token shards hold codes only")
            if self.source == "shards" and not self.speech_encoder:
                raise ValueError("speech_input continuous needs speech_encoder (a SenseVoiceSmall "
                                 "folder)")
        return self

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source == "synthetic":
            return self
        if bool(self.mixture) == bool(self.paths):
            raise ValueError(f"source {self.source} needs exactly one of mixture or paths")
        if self.mixture and not self.stage:
            raise ValueError("a mixture needs stage (the curriculum stage whose ratios to draw)")
        if self.source == "shards" and not (self.image_tokenizer and self.speech_tokenizer):
            raise ValueError("source shards needs image_tokenizer and speech_tokenizer "
                             "({kind, path}; omnidiff fit-tokenizers makes demo ones)")
        return self
