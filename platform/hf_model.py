"""The Hugging Face ``transformers`` form of the platform's model, for export, import and inference.

Plain PyTorch on purpose: this class is what people load outside the platform, and it is the
independent reference the megatron-core model is checked against (tests/test_model_equivalence).
Module names follow Qwen2 / Dream (``model.layers.i.self_attn.q_proj`` ...) so a Dream-7B
checkpoint loads as is. Differences from Qwen2: attention is fully bidirectional, packed rows
attend block-diagonally by ``segment_ids``, and the embedding has no ``padding_idx`` (the pad token
``<|endoftext|>`` is also a trained target). ``forward`` returns raw logits; ``config.label_shift``
tells the caller that the logit at position i predicts token i+1 (Dream), and the sampler and loss
apply that shift, exactly as for the megatron-core model.

``forward(input_ids, attention_mask, position_ids)`` is Qwen2's / Dream's argument order, and the
attention mask takes Dream's forms too (``"full"``, a boolean ``[b, 1, s, s]``), so Dream's own
``diffusion_generate`` can drive this class. The file imports only torch and transformers: an
export copies it next to the weights as ``modeling_omnidiffusion.py`` (``trust_remote_code``).
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import MaskedLMOutput


def resolve_rope_theta(rope_theta: float | None, rope_parameters: dict | None,
                       rope_scaling: dict | None = None) -> float | None:
    """The RoPE base wherever a config keeps it: ``rope_parameters`` (transformers 5), else
    the legacy ``rope_scaling`` dict, else the top-level ``rope_theta`` (Dream, transformers 4).
    Scaled RoPE (linear, yarn, llama3 ...) and partial rotary embeddings are refused: this model
    implements neither, and ignoring them would silently change the function."""
    for key, params in (("rope_parameters", rope_parameters), ("rope_scaling", rope_scaling)):
        if not params:
            continue
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"{key} {params!r}: per-layer RoPE settings are not supported")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{key}: rope_type {kind!r} is not implemented (OmniDiffusion uses "
                             "plain RoPE, rope_type 'default')")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{key}: partial_rotary_factor != 1 is not implemented")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return rope_theta


class OmniDiffusionConfig(PretrainedConfig):
    """Qwen2-style shape fields plus the diffusion facts. Defaults are Dream-7B with the
    Omni-Diffusion vocabulary (REFERENCE §1-2). ``vocab_size`` is the number of embedding rows
    (padded), as Dream's own 152,064; ``real_vocab_size`` (when known) the ids that are tokens.
    The RoPE base is read from ``rope_parameters`` or a top-level ``rope_theta``
    (:func:`resolve_rope_theta`) and written to both."""

    model_type = "omnidiffusion"

    def __init__(
        self,
        vocab_size: int = 176_264,
        hidden_size: int = 3584,
        intermediate_size: int = 18_944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int = 4,
        rope_theta: float = 1_000_000.0,
        rope_parameters: dict | None = None,
        rope_scaling: dict | None = None,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 131_072,
        initializer_range: float = 0.02,
        attention_bias: bool = True,
        mask_token_id: int = 151_666,
        pad_token_id: int | None = 151_643,
        eos_token_id: int | None = 151_643,
        label_shift: bool = True,
        tie_word_embeddings: bool = False,
        real_vocab_size: int | None = None,
        speech_feature_size: int | None = None,
        **kwargs,
    ) -> None:
        if hidden_size % num_attention_heads:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) must divide "
                             f"hidden_size ({hidden_size})")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({num_key_value_heads}) must divide "
                             f"num_attention_heads ({num_attention_heads})")
        if tie_word_embeddings:
            raise ValueError("tie_word_embeddings: the platform's lm_head is always untied")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.rope_theta = resolve_rope_theta(rope_theta, rope_parameters, rope_scaling)
        self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.attention_bias = attention_bias
        self.mask_token_id = mask_token_id
        self.label_shift = label_shift
        self.real_vocab_size = real_vocab_size
        self.speech_feature_size = speech_feature_size  # continuous speech input, when set
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class OmniDiffusionRMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in fp32, cast back, then scale (the order matters in bf16)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``[b, 1, s, head_dim]`` for the rotate-half convention, computed in fp32.

    Computed per call rather than kept as a buffer: non-persistent buffers are not restored by
    ``from_pretrained``'s meta-device loading, and the cost is negligible next to attention.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (exponent.float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [b, s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def packed_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 wherever the segment id changes (each packed sample alone)."""
    seq = segment_ids.shape[-1]
    index = torch.arange(seq, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=-1).values


# None / "full" / [b, s] 0-1 / boolean [b, 1, s, s]; typing.Union: older Pythons load this file too
AttentionMask = Union[torch.Tensor, str, None]


def attention_allowed(segment_ids: torch.Tensor | None,
                      attention_mask: AttentionMask) -> torch.Tensor | None:
    """Boolean ``[b, 1, s, s]`` mask (True = may attend), or None for full attention.

    ``attention_mask`` is None or ``"full"`` (Dream: attend everywhere), ``[b, s]`` of 0/1
    (1 = real key) or a boolean ``[b, 1, s, s]`` (Dream's padded batches: True = may attend).
    Query i sees key j iff every given mask allows it and, with ``segment_ids``, both share a
    segment. Every query also sees itself, so a padding query whose keys are all masked stays
    finite instead of NaN (its output is never used; real queries always see themselves anyway).
    """
    if isinstance(attention_mask, str):
        if attention_mask != "full":
            raise ValueError(f"attention_mask {attention_mask!r}: the only string form is 'full'")
        attention_mask = None
    if segment_ids is None and attention_mask is None:
        return None
    ref = segment_ids if segment_ids is not None else attention_mask
    b, s = ref.shape[0], ref.shape[-1]
    allowed = torch.ones(b, 1, s, s, dtype=torch.bool, device=ref.device)
    if segment_ids is not None:
        allowed &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if attention_mask is not None:
        allowed &= _as_allowed(attention_mask, b, s)
    return allowed | torch.eye(s, dtype=torch.bool, device=ref.device)


def _as_allowed(attention_mask: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """A ``[b, s]`` key mask or a ``[b, 1, s, s]`` boolean mask as ``[b, 1, s, s]`` booleans."""
    if attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (s, s):
            raise ValueError(f"a 4-D attention_mask must be boolean [b, 1, {s}, {s}] (True = may "
                             f"attend), got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        return attention_mask
    if attention_mask.shape != (b, s):
        raise ValueError(f"attention_mask must be [batch, seq] = {(b, s)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool and ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask [batch, seq] must hold 0/1 (1 = real token); "
                         "positions go in position_ids")
    return attention_mask.bool()[:, None, None, :]


class OmniDiffusionAttention(nn.Module):
    """Bidirectional grouped-query self-attention with RoPE; q/k/v biased, o_proj not."""

    def __init__(self, config: OmniDiffusionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Query head i reads KV head i // (heads per group), as Qwen2's repeat_kv.
        repeat = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class OmniDiffusionMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: OmniDiffusionConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OmniDiffusionDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: OmniDiffusionConfig) -> None:
        super().__init__()
        self.input_layernorm = OmniDiffusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = OmniDiffusionAttention(config)
        self.post_attention_layernorm = OmniDiffusionRMSNorm(config.hidden_size,
                                                             config.rms_norm_eps)
        self.mlp = OmniDiffusionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


class OmniDiffusionPreTrainedModel(PreTrainedModel):
    """Shared HF plumbing; the library's default ``_init_weights`` covers every module here
    (normal(0, initializer_range) for Linear/Embedding, zero biases, ones for *RMSNorm)."""

    config_class = OmniDiffusionConfig
    base_model_prefix = "model"
    _no_split_modules = ["OmniDiffusionDecoderLayer"]


class AudioProjection(nn.Module):
    """The released speech projector: LayerNorm -> Linear -> GELU -> Linear, no biases (kept
    here rather than imported: this file must load without omnidiff installed)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.pre_proj_layernorm = nn.LayerNorm(input_size)
        self.mlp = nn.Sequential(nn.Linear(input_size, hidden_size, bias=False), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size, bias=False))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pre_proj_layernorm(features))


class OmniDiffusionModel(OmniDiffusionPreTrainedModel):
    """The backbone: embedding, decoder layers, final norm -> hidden states ``[b, s, h]``.

    With ``config.speech_feature_size``, continuous speech features (a frozen speech encoder's,
    ``[n, f]``) are projected into the embeddings at ``speech_positions`` (flat over ``b s``:
    the ``<|context_of_audio|>`` tokens).
    """

    def __init__(self, config: OmniDiffusionConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.speech_feature_size:
            self.audio_projection = AudioProjection(config.speech_feature_size,
                                                    config.hidden_size)
        self.layers = nn.ModuleList(
            OmniDiffusionDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = OmniDiffusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, attention_mask: AttentionMask = None,
                position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None,
                speech_features: torch.Tensor | None = None,
                speech_positions: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = packed_position_ids(segment_ids)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
                position_ids = position_ids.expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        if speech_features is not None and len(speech_features):
            if not self.config.speech_feature_size:
                raise ValueError("this model hears no continuous speech (speech_feature_size)")
            projected = self.audio_projection(speech_features.to(x.dtype))
            x = x.reshape(-1, x.shape[-1]).index_put((speech_positions,), projected).view_as(x)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta,
                                  x.dtype)
        allowed = attention_allowed(segment_ids, attention_mask)
        for layer in self.layers:
            x = layer(x, cos, sin, allowed)
        return self.norm(x)


class OmniDiffusionForMaskedDiffusion(OmniDiffusionPreTrainedModel):
    """Backbone + untied LM head. ``forward(...).logits`` is ``[b, s, vocab_size]``."""

    def __init__(self, config: OmniDiffusionConfig) -> None:
        super().__init__(config)
        self.model = OmniDiffusionModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: AttentionMask = None,
                position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None,
                speech_features: torch.Tensor | None = None,
                speech_positions: torch.Tensor | None = None) -> MaskedLMOutput:
        """``segment_ids`` (1, 2, ... per packed sample, 0 = unused tail) make attention
        block-diagonal; ``attention_mask`` hides keys (see :func:`attention_allowed`: ``[b, s]``
        0/1, Dream's ``"full"`` or boolean ``[b, 1, s, s]``); positions default to restarting
        per segment (or 0..s-1 without segments). Arguments in Qwen2's / Dream's order."""
        hidden = self.model(input_ids, attention_mask, position_ids, segment_ids,
                            speech_features, speech_positions)
        return MaskedLMOutput(logits=self.lm_head(hidden))


AutoConfig.register(OmniDiffusionConfig.model_type, OmniDiffusionConfig, exist_ok=True)
AutoModel.register(OmniDiffusionConfig, OmniDiffusionForMaskedDiffusion, exist_ok=True)
AutoModelForMaskedLM.register(OmniDiffusionConfig, OmniDiffusionForMaskedDiffusion, exist_ok=True)
