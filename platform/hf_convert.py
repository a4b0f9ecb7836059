"""Weight conversion between the megatron-core model (TP=1 state dict) and the HF class.

The one non-trivial piece is megatron's fused QKV. Checked against megatron-core 0.16.1
``SelfAttention.get_query_key_value_tensors``: ``linear_qkv`` output is viewed as
``[ng, (nq/ng + 2) * d]`` and split per query group into ``[q heads of group g, k_g, v_g]``;
query head ``g * nq/ng + j`` reads KV group ``g``, which is HF's ``repeat_kv`` order, so the
q/k/v rows only need regrouping, never permuting within heads. ``linear_fc1`` is ``[gate; up]``.
Both RoPE implementations use the rotate-half layout, so no row permutation is needed there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from omnidiff.platform.config import ModelConfig
from omnidiff.platform.hf_model import OmniDiffusionConfig, resolve_rope_theta

Tensor = torch.Tensor

# Tensors that only change name: (megatron name, HF name); per-layer ones without the prefixes.
_RENAMES = (
    ("embedding.weight", "model.embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
)
_LAYER_RENAMES = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
)


# HF config key -> run config ``model`` key, for the shape facts both spell out.
HF_MODEL_KEYS = (("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
                 ("num_attention_heads", "num_attention_heads"),
                 ("num_key_value_heads", "num_query_groups"),
                 ("intermediate_size", "ffn_hidden_size"), ("rms_norm_eps", "norm_eps"))
DEFAULT_ROPE_THETA = 10_000.0  # transformers' default when a config names no RoPE base


def model_fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The run config's ``model`` keys an HF ``config.json`` (Qwen2, Dream or OmniDiffusion
    spelling) fixes; raises ``KeyError`` naming a missing HF key, ``ValueError`` for RoPE the
    model does not implement."""
    hf = dict(hf)
    hf.setdefault("num_key_value_heads", hf.get("num_attention_heads"))
    fields = {}
    for theirs, ours in HF_MODEL_KEYS:
        if hf.get(theirs) is None:
            raise KeyError(f"HF config has no {theirs!r}")
        fields[ours] = hf[theirs]
    fields["rope_theta"] = resolve_rope_theta(hf.get("rope_theta", DEFAULT_ROPE_THETA),
                                              hf.get("rope_parameters"), hf.get("rope_scaling"))
    if hf.get("max_position_embeddings"):
        fields["max_position_embeddings"] = hf["max_position_embeddings"]
    return fields


def hf_config_from(model_cfg: ModelConfig, vocab_size: int, *, mask_token_id: int,
                   pad_token_id: int, eos_token_id: int | None = None,
                   label_shift: bool = True, real_vocab_size: int | None = None,
                   speech_feature_size: int | None = None) -> OmniDiffusionConfig:
    """The HF config for a platform model shape; ``vocab_size`` is the (padded) embedding rows,
    ``real_vocab_size`` the ids that are tokens; ``speech_feature_size`` for continuous speech."""
    return OmniDiffusionConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups,
        rope_theta=model_cfg.rope_theta,
        rms_norm_eps=model_cfg.norm_eps,
        max_position_embeddings=model_cfg.max_position_embeddings,
        initializer_range=model_cfg.init_std,
        attention_bias=model_cfg.qkv_bias,
        mask_token_id=mask_token_id,
        pad_token_id=pad_token_id,
        eos_token_id=pad_token_id if eos_token_id is None else eos_token_id,
        label_shift=label_shift,
        real_vocab_size=real_vocab_size,
        speech_feature_size=speech_feature_size,
    )


# the speech projector (continuous speech input): megatron prefix, HF prefix (the release's)
_PROJECTOR = ("speech_projector.", "model.audio_projection.")
_PROJECTOR_NORM = "pre_proj_layernorm.weight"


def _feature_size(state: Mapping[str, Tensor], prefix: str) -> int | None:
    """The projector's input size, from its norm (None: the model hears codes only)."""
    norm = state.get(prefix + _PROJECTOR_NORM)
    return None if norm is None else norm.shape[0]


def megatron_to_hf(state_dict: Mapping[str, Tensor], model_cfg: ModelConfig) -> dict[str, Tensor]:
    """TP=1 megatron-core state dict -> HF ``OmniDiffusionForMaskedDiffusion`` state dict."""
    src = {k: v for k, v in state_dict.items() if not k.endswith("._extra_state")}
    _check(src, megatron_shapes(model_cfg, _rows(src, "embedding.weight"),
                                _feature_size(src, _PROJECTOR[0])), "megatron")
    return _to_hf(src, model_cfg)


def _to_hf(src: Mapping[str, Tensor], model_cfg: ModelConfig) -> dict[str, Tensor]:
    out = {hf: src[mg] for mg, hf in _RENAMES}
    out |= {_PROJECTOR[1] + k[len(_PROJECTOR[0]):]: v for k, v in src.items()
            if k.startswith(_PROJECTOR[0])}
    for i in range(model_cfg.num_layers):
        mp, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        out |= {hp + hf: src[mp + mg] for mg, hf in _LAYER_RENAMES}
        for suffix in ("weight", "bias") if model_cfg.qkv_bias else ("weight",):
            fused = src[f"{mp}self_attention.linear_qkv.{suffix}"]
            for name, t in zip("qkv", _split_qkv(fused, model_cfg)):
                out[f"{hp}self_attn.{name}_proj.{suffix}"] = t
        gate, up = src[mp + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = _own(gate), _own(up)
    return out


def hf_to_megatron(state_dict: Mapping[str, Tensor], model_cfg: ModelConfig) -> dict[str, Tensor]:
    """HF state dict -> TP=1 megatron-core state dict (load with ``strict=False`` for the
    ``_extra_state`` entries megatron adds)."""
    src = dict(state_dict)
    _check(src, _hf_shapes(model_cfg, _rows(src, "model.embed_tokens.weight"),
                           _feature_size(src, _PROJECTOR[1])), "HF")
    out = {mg: src[hf] for mg, hf in _RENAMES}
    out |= {_PROJECTOR[0] + k[len(_PROJECTOR[1]):]: v for k, v in src.items()
            if k.startswith(_PROJECTOR[1])}
    for i in range(model_cfg.num_layers):
        mp, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        out |= {mp + mg: src[hp + hf] for mg, hf in _LAYER_RENAMES}
        for suffix in ("weight", "bias") if model_cfg.qkv_bias else ("weight",):
            parts = (src[f"{hp}self_attn.{name}_proj.{suffix}"] for name in "qkv")
            out[f"{mp}self_attention.linear_qkv.{suffix}"] = _fuse_qkv(*parts, model_cfg)
        out[mp + "mlp.linear_fc1.weight"] = torch.cat(
            [src[hp + "mlp.gate_proj.weight"], src[hp + "mlp.up_proj.weight"]], dim=0)
    return out


def _own(t: Tensor) -> Tensor:
    """A contiguous tensor with its own storage (safetensors refuses shared storage)."""
    return t.clone(memory_format=torch.contiguous_format)


def _split_qkv(fused: Tensor, model_cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron's per-group ``[q.., k, v]`` rows -> HF q, k, v (weights ``[rows, h]`` or biases)."""
    ng, d = model_cfg.num_query_groups, model_cfg.head_dim
    per_group = model_cfg.num_attention_heads // ng
    rest = fused.shape[1:]
    grouped = fused.reshape(ng, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return tuple(_own(t).reshape(-1, *rest) for t in (q, k, v))


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, model_cfg: ModelConfig) -> Tensor:
    """HF q, k, v -> megatron's per-group ``[q.., k, v]`` rows."""
    ng, rest = model_cfg.num_query_groups, q.shape[1:]
    grouped = torch.cat([t.reshape(ng, -1, *rest) for t in (q, k, v)], dim=1)
    return grouped.reshape(-1, *rest)


def megatron_shapes(model_cfg: ModelConfig, vocab_rows: int,
                    speech_feature_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of the TP=1 megatron model and its shape: the one shape table."""
    h, f, d = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.head_dim
    nq, ng = model_cfg.num_attention_heads, model_cfg.num_query_groups
    shapes = {"embedding.weight": (vocab_rows, h), "decoder.final_layernorm.weight": (h,),
              "output_layer.weight": (vocab_rows, h)}
    if speech_feature_size:
        p, a = _PROJECTOR[0], speech_feature_size
        shapes |= {p + _PROJECTOR_NORM: (a,), p + "pre_proj_layernorm.bias": (a,),
                   p + "mlp.0.weight": (h, a), p + "mlp.2.weight": (h, h)}
    for i in range(model_cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "pre_mlp_layernorm.weight": (h,),
                   p + "self_attention.linear_qkv.weight": ((nq + 2 * ng) * d, h),
                   p + "self_attention.linear_proj.weight": (h, nq * d),
                   p + "mlp.linear_fc1.weight": (2 * f, h), p + "mlp.linear_fc2.weight": (h, f)}
        if model_cfg.qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = ((nq + 2 * ng) * d,)
    return shapes


def _hf_shapes(model_cfg: ModelConfig, vocab_rows: int,
               speech_feature_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """The HF shapes, derived from the megatron table by converting shape-only tensors."""
    meta = {key: torch.empty(shape, device="meta") for key, shape in
            megatron_shapes(model_cfg, vocab_rows, speech_feature_size).items()}
    return {k: tuple(v.shape) for k, v in _to_hf(meta, model_cfg).items()}


def _rows(state: Mapping[str, Tensor], key: str) -> int:
    if key not in state:
        raise KeyError(f"state dict has no {key!r}")
    return state[key].shape[0]


def _check(state: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Bad input fails with one line naming the key, before any conversion work."""
    for key, shape in shapes.items():
        if key not in state:
            raise KeyError(f"{what} state dict has no {key!r}")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{what} {key}: shape {tuple(state[key].shape)}, expected {shape}")
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise ValueError(f"{what} state dict has {len(extra)} unexpected keys, e.g. {extra[:3]}")
