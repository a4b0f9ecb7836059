"""SenseVoiceSmall speech encoder (frozen) and the trainable speech projector of Omni-Diffusion.

The released Omni-Diffusion hears speech through FunAudioLLM/SenseVoiceSmall: the FunASR
``WavFrontend`` (:mod:`omnidiff.data.tokenizers.fbank`: 80-bin fbank, LFR 7/6 -> 560-d every 60 ms,
CMVN from ``am.mvn``), four query embeddings prepended in feature space (language, event,
emotion, text-norm: ``embed`` ids ``[lid, 1, 2, textnorm]`` with ``lid`` = 0 for "auto" and
``textnorm`` = 15 for "woitn", the values Omni-Diffusion passes), then ``SenseVoiceEncoderSmall``:
input scaled by ``sqrt(output_size)``, sinusoidal positions (1-based, ``[sin | cos]`` halves),
``encoders0`` (1 SAN-M layer, 560 -> 512, no attention residual), ``encoders`` (``num_blocks - 1``
layers), ``after_norm``, ``tp_encoders`` (``tp_blocks`` layers), ``tp_norm``. A SAN-M layer is pre-LN
multi-head attention (fused ``linear_q_k_v``) plus an FSMN memory (depthwise ``fsmn_block`` conv over
V, ``kernel_size`` 11, added to V) and a ReLU feed-forward.

Output: ``[4 + frames, 512]`` per clip, ``frames = ceil((1 + (samples - 400) // 160) / 6)``, one per
60 ms. The 4 query frames are KEPT, as the release does (``modeling_sensevoice.AudioEncoder`` returns
``encoder_out_lens`` including them, and the data pipeline inserts ``frames + 4``
``<|context_of_audio|>`` placeholders between ``<|begin_of_audio|>`` and ``<|end_of_audio|>``);
``strip_queries=True`` drops them. The release runs the encoder in bf16 on GPU; here it runs in
float32 under ``torch.no_grad`` with every parameter frozen.

Checkpoint layout (released ``model.pt``, loaded by key): ``embed.weight`` [16, 560] and
``encoder.{encoders0.0, encoders.i, tp_encoders.i}.{self_attn.linear_q_k_v, self_attn.linear_out,
self_attn.fsmn_block, feed_forward.w_1, feed_forward.w_2, norm1, norm2}.*``,
``encoder.after_norm.*``, ``encoder.tp_norm.*``; the CTC head ``ctc.ctc_lo.*`` (ASR output only) is
skipped. Directory: ``config.yaml`` (``encoder_conf``, ``frontend_conf``), ``am.mvn`` and
``model.pt`` (read with ``weights_only=True``) or ``model.safetensors``; other files are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from omnidiff.data.tokenizers.base import as_waveform_list
from omnidiff.data.tokenizers.checkpoint import load_by_key, read_state_dict
from omnidiff.data.tokenizers.fbank import FrontendConfig, read_am_mvn, wav_frontend, write_am_mvn

CONFIG_NAME = "config.yaml"
CMVN_NAME = "am.mvn"
WEIGHT_NAMES = ("model.safetensors", "model.pt")
NUM_QUERIES = 4
LANGUAGE_IDS = {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12, "nospeech": 13}
TEXTNORM_IDS = {"withitn": 14, "woitn": 15}
EVENT_ID, EMOTION_ID = 1, 2
NUM_EMBEDDINGS = 7 + len(LANGUAGE_IDS) + len(TEXTNORM_IDS)  # 16, as released


@dataclass(frozen=True)
class SenseVoiceConfig:
    """``encoder_conf`` of the released ``config.yaml`` (defaults = SenseVoiceSmall) + the front end."""

    output_size: int = 512
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 50
    tp_blocks: int = 20
    kernel_size: int = 11
    sanm_shfit: int = 0
    frontend: FrontendConfig = field(default_factory=FrontendConfig)

    @property
    def input_size(self) -> int:
        return self.frontend.feature_dim

    @classmethod
    def from_yaml(cls, path: Path) -> SenseVoiceConfig:
        raw = yaml.safe_load(path.read_text()) or {}
        enc = raw.get("encoder_conf") or {}
        if raw.get("encoder", "SenseVoiceEncoderSmall") != "SenseVoiceEncoderSmall":
            raise ValueError(f"{path}: encoder {raw.get('encoder')!r} is not SenseVoiceEncoderSmall")
        if enc.get("normalize_before", True) is not True or enc.get("selfattention_layer_type", "sanm") != "sanm":
            raise ValueError(f"{path}: only the released pre-norm SAN-M encoder is supported")
        front_conf = raw.get("frontend_conf") or {}
        front = {f.name: front_conf[f.name] for f in fields(FrontendConfig) if front_conf.get(f.name) is not None}
        names = {f.name for f in fields(cls)} - {"frontend"}
        return cls(**{k: enc[k] for k in names if k in enc}, frontend=FrontendConfig(**front))

    def to_yaml(self) -> str:
        enc = {k: v for k, v in asdict(self).items() if k != "frontend"}
        enc.update(input_layer="pe", pos_enc_class="SinusoidalPositionEncoder", normalize_before=True,
                   selfattention_layer_type="sanm")
        return yaml.safe_dump({"encoder": "SenseVoiceEncoderSmall", "encoder_conf": enc, "model": "SenseVoiceSmall",
                               "frontend": "WavFrontend", "frontend_conf": asdict(self.frontend)}, sort_keys=False)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as the release's ``LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.type_as(x)


class SANMAttention(nn.Module):
    """Multi-head self-attention with an FSMN memory block on the values."""

    def __init__(self, heads: int, in_size: int, size: int, kernel_size: int, shift: int) -> None:
        super().__init__()
        self.heads = heads
        self.linear_out = nn.Linear(size, size)
        self.linear_q_k_v = nn.Linear(in_size, 3 * size)
        self.fsmn_block = nn.Conv1d(size, size, kernel_size, groups=size, bias=False)
        left = (kernel_size - 1) // 2 + max(shift, 0)
        self.padding = (left, kernel_size - 1 - left)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``x`` [b, t, in], ``valid`` [b, t] bool -> [b, t, size]."""
        b, t, _ = x.shape
        q, k, v = self.linear_q_k_v(x).chunk(3, dim=-1)
        keep = valid[..., None].to(v.dtype)
        masked_v = v * keep
        memory = self.fsmn_block(F.pad(masked_v.transpose(1, 2), self.padding)).transpose(1, 2)
        memory = (memory + masked_v) * keep
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return self.linear_out(att.transpose(1, 2).reshape(b, t, -1)) + memory


class FeedForward(nn.Module):
    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(size, hidden)
        self.w_2 = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class SANMLayer(nn.Module):
    """Pre-LN SAN-M encoder layer; the attention residual is skipped when ``in_size != size``."""

    def __init__(self, in_size: int, cfg: SenseVoiceConfig) -> None:
        super().__init__()
        size = cfg.output_size
        self.self_attn = SANMAttention(cfg.attention_heads, in_size, size, cfg.kernel_size, cfg.sanm_shfit)
        self.feed_forward = FeedForward(size, cfg.linear_units)
        self.norm1 = LayerNorm32(in_size)
        self.norm2 = LayerNorm32(size)
        self.residual = in_size == size

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        att = self.self_attn(self.norm1(x), valid)
        x = x + att if self.residual else att
        return x + self.feed_forward(self.norm2(x))


def sinusoidal_positions(length: int, depth: int, dtype: torch.dtype) -> torch.Tensor:
    """FunASR ``SinusoidalPositionEncoder``: positions 1..length, ``[sin | cos]``, ``depth/2 - 1`` divisor."""
    increment = math.log(10000.0) / (depth / 2 - 1)
    inv = torch.exp(torch.arange(depth // 2, dtype=torch.float32) * -increment)
    scaled = torch.arange(1, length + 1, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1).to(dtype)


class SenseVoiceEncoderSmall(nn.Module):
    def __init__(self, cfg: SenseVoiceConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoders0 = nn.ModuleList([SANMLayer(cfg.input_size, cfg)])
        self.encoders = nn.ModuleList(SANMLayer(cfg.output_size, cfg) for _ in range(cfg.num_blocks - 1))
        self.tp_encoders = nn.ModuleList(SANMLayer(cfg.output_size, cfg) for _ in range(cfg.tp_blocks))
        self.after_norm = LayerNorm32(cfg.output_size)
        self.tp_norm = LayerNorm32(cfg.output_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        x = x * self.config.output_size**0.5
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.dtype)
        for layer in [*self.encoders0, *self.encoders]:
            x = layer(x, valid)
        x = self.after_norm(x)
        for layer in self.tp_encoders:
            x = layer(x, valid)
        return self.tp_norm(x)


class SenseVoiceSmall(nn.Module):
    """Query embeddings + encoder, keyed like the released ``model.pt`` (minus the CTC head)."""

    def __init__(self, cfg: SenseVoiceConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(NUM_EMBEDDINGS, cfg.input_size)
        self.encoder = SenseVoiceEncoderSmall(cfg)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, language: str = "auto",
                text_norm: str = "woitn") -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, T, 560]`` LFR+CMVN features -> ``[b, 4 + T, 512]`` and lengths ``+ 4``."""
        if text_norm not in TEXTNORM_IDS:
            raise ValueError(f"SenseVoice text_norm must be one of {sorted(TEXTNORM_IDS)}, got {text_norm!r}")
        ids = torch.tensor([LANGUAGE_IDS.get(language, 0), EVENT_ID, EMOTION_ID, TEXTNORM_IDS[text_norm]])
        queries = self.embed(ids).to(feats.dtype).expand(feats.shape[0], -1, -1)
        lengths = lengths + NUM_QUERIES
        return self.encoder(torch.cat([queries, feats], dim=1), lengths), lengths


class SenseVoiceSpeechEncoder:
    """Frozen SenseVoiceSmall: 16 kHz waveforms -> ``[4 + frames, 512]`` features per clip (60 ms frames)."""

    sample_rate = 16_000

    def __init__(self, model: SenseVoiceSmall, cmvn: torch.Tensor | None, *, language: str = "auto",
                 text_norm: str = "woitn", strip_queries: bool = False, seed: int = 0) -> None:
        if cmvn is not None and tuple(cmvn.shape) != (2, model.config.input_size):
            raise ValueError(f"SenseVoice CMVN shape {tuple(cmvn.shape)} != (2, {model.config.input_size})")
        self.model = model.eval().requires_grad_(False)
        self.cmvn = cmvn
        self.language, self.text_norm, self.strip_queries = language, text_norm, strip_queries
        self.generator = torch.Generator().manual_seed(seed)  # only used when the config dithers

    @property
    def config(self) -> SenseVoiceConfig:
        return self.model.config

    @property
    def output_size(self) -> int:
        return self.config.output_size

    def num_frames(self, num_samples: int) -> int:
        """Rows :meth:`__call__` returns for a clip of ``num_samples`` (placeholder count for the backbone)."""
        queries = 0 if self.strip_queries else NUM_QUERIES
        return self.config.frontend.num_lfr_frames(num_samples) + queries

    def features(self, waveforms: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Front end only: ``[frames, 560]`` LFR + CMVN features per clip."""
        front = self.config.frontend
        return [wav_frontend(w, front, self.cmvn, self.generator) for w in as_waveform_list(waveforms)]

    @torch.no_grad()
    def __call__(self, waveforms: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        feats = self.features(waveforms)
        lengths = torch.tensor([f.shape[0] for f in feats])
        out, out_lengths = self.model(nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths,
                                      self.language, self.text_norm)
        start = NUM_QUERIES if self.strip_queries else 0
        return [row[start:n] for row, n in zip(out, out_lengths.tolist())]

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> SenseVoiceSpeechEncoder:
        """A local SenseVoiceSmall directory in the released layout (see the module docstring)."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"SenseVoice directory has no {CONFIG_NAME}: {directory}")
        cfg = SenseVoiceConfig.from_yaml(directory / CONFIG_NAME)
        weights = next((directory / n for n in WEIGHT_NAMES if (directory / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"SenseVoice directory has no weights ({' or '.join(WEIGHT_NAMES)}): {directory}")
        model = SenseVoiceSmall(cfg)
        load_by_key(model, read_state_dict(weights), what=f"SenseVoiceSmall ({weights})",
                    drop=lambda key: key.startswith("ctc."))
        if not (directory / CMVN_NAME).is_file():
            raise FileNotFoundError(f"SenseVoice directory has no {CMVN_NAME}: {directory}")
        return cls(model, read_am_mvn(directory / CMVN_NAME, cfg.input_size), **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.yaml``, ``am.mvn`` and ``model.pt`` (a plain state dict) in the released layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(self.config.to_yaml())
        cmvn = self.cmvn if self.cmvn is not None else torch.stack([torch.zeros(self.config.input_size),
                                                                     torch.ones(self.config.input_size)])
        write_am_mvn(directory / CMVN_NAME, cmvn[0], cmvn[1])
        torch.save({k: v.contiguous() for k, v in self.model.state_dict().items()}, directory / "model.pt")
        return directory


class SpeechProjector(nn.Module):
    """Trainable projector into the backbone: LayerNorm(512) -> Linear -> GELU -> Linear.

    Keys match the release's ``ResamplerProjector`` (``model.audio_projection.*`` in Omni-Diffusion
    checkpoints): ``pre_proj_layernorm``, ``mlp.0`` and ``mlp.2``; both linears have no bias there.
    """

    def __init__(self, input_size: int = 512, hidden_size: int = 3584, bias: bool = False) -> None:
        super().__init__()
        self.pre_proj_layernorm = nn.LayerNorm(input_size)
        self.mlp = nn.Sequential(nn.Linear(input_size, hidden_size, bias=bias), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size, bias=bias))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pre_proj_layernorm(x))
