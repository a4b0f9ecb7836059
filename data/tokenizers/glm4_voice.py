"""GLM-4-Voice speech tokenizer (encoder side): Whisper encoder truncated at a vector quantiser.

Layout of ``THUDM/glm-4-voice-tokenizer`` (``WhisperVQEncoder``), matched by key so the real
checkpoint loads: ``conv1``/``conv2`` (causal when ``encoder_causal_convolution``),
``embed_positions``, ``layers.{i}`` (Whisper encoder layers, built from transformers'
``WhisperEncoderLayer``), ``codebook`` (``quantize_vocab_size`` x d_model) and
``embed_positions2``. Pipeline: 16 kHz -> Whisper log-mel (hop 10 ms, ``num_mel_bins``) ->
conv stride 2 (50 Hz) -> layers, average pooling by ``pooling_kernel_size`` after layer
``pooling_position`` (12.5 Hz) -> nearest codebook entry after layer ``quantize_position``.
Attention is block-causal (blocks of ``quantize_causal_block_size`` 50 Hz frames) over valid frames.

Code count: audio is padded to a multiple of 1280 samples (10 ms hop x 2 x 4), so ``n`` samples
give exactly ``ceil(n / 1280)`` codes, i.e. ``ceil(12.5 * seconds)``; audio longer than 30 s is
cut into 30 s segments (375 codes each), as the release does.

Decoding (codes -> speech) uses GLM-4-Voice's flow-matching decoder and HiFT vocoder
(:mod:`omnidiff.data.tokenizers.glm4_voice_decoder`) and returns audio at **22,050 Hz**
(:attr:`Glm4VoiceTokenizer.decoded_sample_rate`), not the 16 kHz of the input: ``n`` codes give
``256 * floor(441 n / 64)`` samples. Directory layout::

    <tokenizer>/config.json, model.safetensors, preprocessor_config.json   (glm-4-voice-tokenizer)
    <tokenizer>/decoder/config.yaml, flow.pt, hift.pt                      (glm-4-voice-decoder, optional)

(the sub-folder may also keep the release's name, ``glm-4-voice-decoder/``). Without it,
:meth:`Glm4VoiceTokenizer.decode` raises ``NotImplementedError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

from omnidiff.data.tokenizers.base import SpeechTokenizer, as_waveform_list, register_media_tokenizer
from omnidiff.data.tokenizers.checkpoint import load_by_key, read_state_dict
from omnidiff.data.tokenizers.glm4_voice_decoder import CONFIG_NAME as DECODER_CONFIG_NAME
from omnidiff.data.tokenizers.glm4_voice_decoder import Glm4VoiceDecoder
from omnidiff.data.tokenizers.kmeans import nearest_centroid

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HOP_LENGTH = 160  # Whisper feature hop (10 ms at 16 kHz)
CONV_STRIDE = 2  # conv1 stride 1 x conv2 stride 2
DECODER_DIRS = ("decoder", "glm-4-voice-decoder")  # sub-folder holding the released decoder files


@dataclass(frozen=True)
class WhisperVQConfig:
    """The ``config.json`` fields the tokenizer uses; defaults are the released GLM-4-Voice tokenizer."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    encoder_layers: int = 32
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    encoder_causal_convolution: bool = True
    encoder_causal_attention: bool = False
    quantize_causal_encoder: bool = False
    quantize_causal_block_size: int | None = 200
    pooling_type: str = "avg"
    pooling_kernel_size: int | None = 4
    pooling_position: int | None = 16
    quantize_position: int = 16
    quantize_vocab_size: int = 16384
    quantize_encoder_only: bool = True
    quantize_ema_decay: float | None = 0.99

    def __post_init__(self) -> None:
        if self.pooling_type not in ("avg", "max"):
            raise ValueError(f"WhisperVQ config: pooling_type must be 'avg' or 'max', got {self.pooling_type!r}")
        if self.pooling_position is not None and self.pooling_position > self.quantize_position:
            raise ValueError("WhisperVQ config: pooling_position must not come after quantize_position")

    @property
    def pooling(self) -> int:
        return self.pooling_kernel_size or 1

    @property
    def samples_per_code(self) -> int:
        return HOP_LENGTH * CONV_STRIDE * self.pooling

    @classmethod
    def from_json(cls, path: Path) -> WhisperVQConfig:
        raw = json.loads(path.read_text())
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})

    def to_json(self) -> str:
        return json.dumps({"architectures": ["WhisperVQEncoder"], "model_type": "whisper", **asdict(self)}, indent=2)


class CausalConv1d(nn.Conv1d):
    """Conv1d that pads only on the left, so frame t never sees input after t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.dilation[0] * (self.kernel_size[0] - 1), 0)))


def attention_bias(valid: torch.Tensor, block: int | None, causal: bool) -> torch.Tensor:
    """Additive ``[b, 1, t, t]`` mask: causal, or (if ``block``) causal-or-same-block over valid keys."""
    t = valid.shape[1]
    lower = torch.ones(t, t, dtype=torch.bool).tril()
    if causal:
        allowed = lower.expand(valid.shape[0], t, t)
    else:
        if block is not None:
            blocks = torch.arange(t) // block
            lower = lower | (blocks[:, None] == blocks[None, :])
        else:
            lower = torch.ones_like(lower)
        allowed = lower & valid[:, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=torch.float32)
    return bias.masked_fill_(~allowed, torch.finfo(torch.float32).min).unsqueeze(1)


class WhisperVQEncoder(nn.Module):
    """Mel features -> codes; only the layers up to ``quantize_position`` are built."""

    def __init__(self, cfg: WhisperVQConfig) -> None:
        super().__init__()
        self.config = cfg
        conv = CausalConv1d if cfg.encoder_causal_convolution else nn.Conv1d
        pad = 0 if cfg.encoder_causal_convolution else 1
        self.conv1 = conv(cfg.num_mel_bins, cfg.d_model, 3, padding=pad)
        self.conv2 = conv(cfg.d_model, cfg.d_model, 3, stride=CONV_STRIDE, padding=pad)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, cfg.d_model)
        layer_cfg = WhisperConfig(
            d_model=cfg.d_model, encoder_attention_heads=cfg.encoder_attention_heads,
            encoder_ffn_dim=cfg.encoder_ffn_dim, activation_function=cfg.activation_function,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        )
        layer_cfg._attn_implementation = "sdpa"
        self.layers = nn.ModuleList(WhisperEncoderLayer(layer_cfg) for _ in range(cfg.quantize_position))
        self.codebook = nn.Embedding(cfg.quantize_vocab_size, cfg.d_model)
        # Position table the release adds after quantisation (for the layers past it, which
        # tokenisation does not run); kept so the module's keys equal the checkpoint's.
        self.embed_positions2 = nn.Embedding(math.ceil(cfg.max_source_positions / cfg.pooling), cfg.d_model)

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, mels, T]`` features + ``[b, T]`` validity -> codes ``[b, t]`` and their validity."""
        cfg = self.config
        h = F.gelu(self.conv2(F.gelu(self.conv1(features)))).transpose(1, 2)
        if h.shape[1] > cfg.max_source_positions:
            raise ValueError(f"WhisperVQ input too long: {h.shape[1]} frames > {cfg.max_source_positions}")
        h = h + self.embed_positions.weight[: h.shape[1]]
        valid = frame_mask[:, ::CONV_STRIDE]
        causal = cfg.encoder_causal_attention or cfg.quantize_causal_encoder
        block = cfg.quantize_causal_block_size
        bias = attention_bias(valid, block, causal)
        for index, layer in enumerate(self.layers, start=1):
            h = layer(h, bias)
            if index == cfg.pooling_position and cfg.pooling_kernel_size:
                k = cfg.pooling_kernel_size
                pool = F.avg_pool1d if cfg.pooling_type == "avg" else F.max_pool1d
                h = pool(F.pad(h.transpose(1, 2), (0, -h.shape[1] % k)), k).transpose(1, 2)
                valid = valid[:, ::k]
                bias = attention_bias(valid, None if block is None else block // k, causal)
        codes = nearest_centroid(h.reshape(-1, h.shape[-1]), self.codebook.weight)
        return codes.view(h.shape[:2]), valid.bool()


class Glm4VoiceTokenizer(SpeechTokenizer):
    """GLM-4-Voice speech tokenizer: 16 kHz waveforms -> codes at 12.5 Hz; codes -> 22.05 kHz audio
    when a decoder is attached."""

    def __init__(self, encoder: WhisperVQEncoder, features: WhisperFeatureExtractor,
                 decoder: Glm4VoiceDecoder | None = None) -> None:
        if features.feature_size != encoder.config.num_mel_bins or features.hop_length != HOP_LENGTH:
            raise ValueError("GLM-4-Voice feature extractor does not match the encoder (mel bins / hop length)")
        if decoder is not None and decoder.codebook_size != encoder.config.quantize_vocab_size:
            raise ValueError("GLM-4-Voice decoder vocabulary does not match the tokenizer's codebook")
        self.encoder = encoder.eval().requires_grad_(False)
        self.features = features
        self.decoder = decoder

    @property
    def decoded_sample_rate(self) -> int:
        """Sample rate of :meth:`decode`'s output (22,050 Hz, the HiFT vocoder's)."""
        return self.decoder.sample_rate if self.decoder is not None else 22_050

    @property
    def codebook_size(self) -> int:
        return self.encoder.config.quantize_vocab_size

    @property
    def codes_per_second(self) -> float:
        return self.sample_rate / self.encoder.config.samples_per_code

    @torch.inference_mode()
    def encode(self, batch) -> list[torch.Tensor]:
        waves = as_waveform_list(batch)
        cfg = self.encoder.config
        segment = cfg.max_source_positions * CONV_STRIDE * HOP_LENGTH  # 30 s
        pieces, owners = [], []
        for i, wav in enumerate(waves):
            for start in range(0, wav.numel(), segment):
                pieces.append(wav[start : start + segment].numpy())
                owners.append(i)
        feats = self.features(
            pieces, sampling_rate=self.sample_rate, return_attention_mask=True, return_tensors="pt",
            padding="longest", pad_to_multiple_of=cfg.samples_per_code,
        )
        codes, valid = self.encoder(feats["input_features"].float(), feats["attention_mask"])
        out: list[list[torch.Tensor]] = [[] for _ in waves]
        for owner, row, keep in zip(owners, codes, valid):
            out[owner].append(row[keep])
        return [torch.cat(parts) for parts in out]

    def decode(self, codes, steps: int | None = None) -> list[torch.Tensor]:
        """Code sequences (list of 1-D tensors or ``[b, n]``) -> 22,050 Hz waveforms, one per sequence.

        ``steps`` overrides the flow-matching Euler steps (default: the decoder's, 10 as released).
        """
        if self.decoder is None:
            raise NotImplementedError(
                "GLM-4-Voice decoding needs its flow-matching decoder (codes -> mel) and HiFT vocoder "
                "(mel -> 22.05 kHz audio): put the released glm-4-voice-decoder files (config.yaml, flow.pt, "
                f"hift.pt) in a '{DECODER_DIRS[0]}/' folder of the tokenizer directory"
            )
        rows = list(codes.unbind(0)) if isinstance(codes, torch.Tensor) and codes.ndim == 2 else list(codes)
        return [self.decoder(row, steps) for row in rows]

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Glm4VoiceTokenizer:
        """A local directory with ``config.json``, weights, (optionally) ``preprocessor_config.json`` and
        (optionally) the decoder in ``decoder/`` (see the module docstring)."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"GLM-4-Voice tokenizer directory has no {CONFIG_NAME}: {directory}")
        cfg = WhisperVQConfig.from_json(directory / CONFIG_NAME)
        encoder = WhisperVQEncoder(cfg)
        load_by_key(
            encoder, read_state_dict(directory), what=f"GLM-4-Voice tokenizer ({directory})",
            strip_prefixes=("model.encoder.",),
            drop=lambda key: _after_quantiser_or_training_only(key, cfg.quantize_position),
        )
        if (directory / "preprocessor_config.json").is_file():
            features = WhisperFeatureExtractor.from_pretrained(str(directory), local_files_only=True)
        else:
            features = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins)
        decoder_dir = next((directory / d for d in DECODER_DIRS if (directory / d / DECODER_CONFIG_NAME).is_file()),
                           None)
        decoder = Glm4VoiceDecoder.from_pretrained(decoder_dir) if decoder_dir is not None else None
        return cls(encoder, features, decoder)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the release's file layout (config, safetensors weights, feature-extractor config)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(self.encoder.config.to_json())
        save_file({k: v.contiguous() for k, v in self.encoder.state_dict().items()}, str(directory / WEIGHTS_NAME))
        self.features.save_pretrained(str(directory))
        if self.decoder is not None:
            self.decoder.save_pretrained(directory / DECODER_DIRS[0])
        return directory


def _after_quantiser_or_training_only(key: str, quantize_position: int) -> bool:
    """Checkpoint keys tokenisation never uses: EMA codebook statistics, layers after the quantiser."""
    parts = key.split(".")
    if parts[0] == "layers":
        return int(parts[1]) >= quantize_position
    return parts[0] in ("ema_count", "ema_weight", "layer_norm")


@register_media_tokenizer("glm4voice")
def _load(path: Path) -> Glm4VoiceTokenizer:
    return Glm4VoiceTokenizer.from_pretrained(path)
