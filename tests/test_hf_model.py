"""The Hugging Face model class and the megatron <-> HF weight conversion (no megatron needed)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from omnidiff.data.tokens.packing import TokenSample, collate_rows
from omnidiff.platform.config import ModelConfig
from omnidiff.platform.hf_convert import hf_config_from, hf_to_megatron, megatron_to_hf
from omnidiff.platform.hf_model import OmniDiffusionConfig, OmniDiffusionForMaskedDiffusion

VOCAB = 96
PAD = 0


def _tiny_cfg() -> ModelConfig:
    return ModelConfig(preset="custom", hidden_size=32, num_layers=2, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=48, rope_theta=10_000.0)


def _model(seed: int = 0) -> OmniDiffusionForMaskedDiffusion:
    torch.manual_seed(seed)
    config = hf_config_from(_tiny_cfg(), VOCAB, mask_token_id=3, pad_token_id=PAD)
    model = OmniDiffusionForMaskedDiffusion(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a layout slip shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.2)
    return model


def _samples(lengths: list[int], seed: int = 1) -> list[TokenSample]:
    g = torch.Generator().manual_seed(seed)
    return [TokenSample(torch.randint(4, VOCAB, (n,), generator=g), torch.ones(n, dtype=torch.bool))
            for n in lengths]


@torch.no_grad()
def test_packed_rows_equal_each_sample_alone():
    model = _model()
    rows = [_samples([5, 7, 3], seed=1), _samples([9, 4], seed=2)]
    batch = collate_rows(rows, seq_length=20, pad_id=PAD)  # both rows have a padding tail
    packed = model(batch.input_ids, position_ids=batch.position_ids,
                   segment_ids=batch.segment_ids).logits
    assert packed.shape == (2, 20, VOCAB)
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            alone = model(sample.tokens[None]).logits[0]
            got = packed[r, start:start + len(sample)]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
            start += len(sample)
    # Positions derived from the segments are the packer's (the padding tail's may differ).
    derived = model(batch.input_ids, segment_ids=batch.segment_ids).logits
    real = batch.segment_ids > 0
    torch.testing.assert_close(derived[real], packed[real], atol=0, rtol=0)


@torch.no_grad()
def test_attention_mask_hides_padding_keys():
    model = _model()
    tokens = _samples([6])[0].tokens
    row = torch.cat([tokens, torch.full((4,), PAD)])[None]
    mask = (torch.arange(10) < 6).long()[None]
    got = model(row, attention_mask=mask).logits[0, :6]
    torch.testing.assert_close(got, model(tokens[None]).logits[0], atol=1e-5, rtol=0)
    unmasked = model(row).logits[0, :6]
    assert (unmasked - got).abs().max() > 1e-3  # the pads would matter if not masked


@torch.no_grad()
def test_attention_is_bidirectional():
    model = _model()
    ids = _samples([8])[0].tokens[None]
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    before, after = model(ids).logits, model(changed).logits
    assert (before[0, 0] - after[0, 0]).abs().max() > 1e-4


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    model = _model()
    ids = _samples([10])[0].tokens[None]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "omnidiffusion"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, OmniDiffusionForMaskedDiffusion)
    assert loaded.config.label_shift is True and loaded.config.mask_token_id == 3
    assert loaded.config.num_key_value_heads == 2 and loaded.config.tie_word_embeddings is False
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def _random_megatron_state(cfg: ModelConfig, vocab: int) -> dict[str, torch.Tensor]:
    """Shapes typed from the megatron-core parameter list, independently of the converter."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
    state = {"embedding.weight": torch.randn(vocab, h),
             "decoder.final_layernorm.weight": torch.randn(h),
             "output_layer.weight": torch.randn(vocab, h)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        state.update({
            p + "input_layernorm.weight": torch.randn(h),
            p + "self_attention.linear_qkv.weight": torch.randn(qkv_rows, h),
            p + "self_attention.linear_qkv.bias": torch.randn(qkv_rows),
            p + "self_attention.linear_proj.weight": torch.randn(h, cfg.num_attention_heads * d),
            p + "pre_mlp_layernorm.weight": torch.randn(h),
            p + "mlp.linear_fc1.weight": torch.randn(2 * f, h),
            p + "mlp.linear_fc2.weight": torch.randn(h, f),
        })
    return state


def test_conversion_round_trips_are_identities():
    cfg = _tiny_cfg()
    state = _random_megatron_state(cfg, VOCAB)
    with_extra = {**state, "decoder.layers.0.self_attention.linear_qkv._extra_state": None}
    hf = megatron_to_hf(with_extra, cfg)
    OmniDiffusionForMaskedDiffusion(hf_config_from(cfg, VOCAB, mask_token_id=3,
                                                   pad_token_id=PAD)).load_state_dict(hf)
    back = hf_to_megatron(hf, cfg)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    model_state = _model().state_dict()
    again = megatron_to_hf(hf_to_megatron(model_state, cfg), cfg)
    assert all(torch.equal(again[k], v) for k, v in model_state.items())


def test_qkv_layout_is_megatrons_per_group_order():
    # 4 query heads in 2 groups, head dim 1: megatron rows are [q0 q1 k0 v0 | q2 q3 k1 v1].
    cfg = ModelConfig(preset="custom", hidden_size=4, num_layers=1, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=2)
    state = _random_megatron_state(cfg, 8)
    state["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.arange(8.0)
    hf = megatron_to_hf(state, cfg)
    assert hf["model.layers.0.self_attn.q_proj.bias"].tolist() == [0, 1, 4, 5]
    assert hf["model.layers.0.self_attn.k_proj.bias"].tolist() == [2, 6]
    assert hf["model.layers.0.self_attn.v_proj.bias"].tolist() == [3, 7]
    fc1 = state["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(hf["model.layers.0.mlp.gate_proj.weight"], fc1[:2])
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], fc1[2:])


def test_conversion_names_bad_keys():
    cfg = _tiny_cfg()
    state = _random_megatron_state(cfg, VOCAB)
    del state["decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(KeyError, match="decoder.layers.1.mlp.linear_fc2.weight"):
        megatron_to_hf(state, cfg)
    state = _random_megatron_state(cfg, VOCAB)
    state["decoder.final_layernorm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match="final_layernorm.weight: shape"):
        megatron_to_hf(state, cfg)


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        OmniDiffusionConfig(num_attention_heads=28, num_key_value_heads=5)


def test_dream_7b_parameter_count_on_meta_device():
    config = hf_config_from(ModelConfig(preset="dream-7b"), 176_264, mask_token_id=151_666,
                            pad_token_id=151_643)
    with torch.device("meta"):
        model = OmniDiffusionForMaskedDiffusion(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 7.79e9) / 7.79e9 < 0.01, count


# --- RoPE base location (failed before: rope_parameters was ignored, theta fell back to 1e6) ---
def test_rope_theta_is_read_from_rope_parameters_of_a_stock_qwen2_config(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2,
                rope_theta=10_000.0).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == 10_000.0
    assert OmniDiffusionConfig.from_pretrained(tmp_path).rope_theta == 10_000.0


def test_rope_theta_at_the_top_level_and_round_trip(tmp_path):
    dream_style = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "rope_theta": 10_000.0, "rope_scaling": None}  # Dream / transformers 4
    config = OmniDiffusionConfig.from_dict(dream_style)
    assert config.rope_theta == 10_000.0
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 10_000.0}
    assert OmniDiffusionConfig.from_pretrained(tmp_path).rope_theta == 10_000.0


@pytest.mark.parametrize("key, params, match", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "'yarn'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "'linear'"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4,
                         "partial_rotary_factor": 0.5}, "partial_rotary_factor")])
def test_rope_scaling_the_model_does_not_implement_is_refused(key, params, match):
    with pytest.raises(ValueError, match=match) as err:
        OmniDiffusionConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            **{key: params})
    assert "\n" not in str(err.value)


# --- Dream's call styles (failed before: the second positional argument was position_ids) ---
@torch.no_grad()
def test_dream_full_attention_string_and_positional_order():
    model = _model()
    ids = _samples([9])[0].tokens[None]
    expected = model(ids).logits
    # Dream's diffusion_generate calls self(x, attention_mask, tok_idx) positionally.
    torch.testing.assert_close(model(ids, "full", None).logits, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="'full'"):
        model(ids, "causal")


@torch.no_grad()
def test_dream_padded_batch_with_a_4d_boolean_mask():
    """Dream's left-padded batch: ``[b, 1, s, s]`` = real query AND real key, positions from
    the cumulative sum of the 2-D mask; the real tokens see exactly what they would alone."""
    model = _model()
    samples = [s.tokens for s in _samples([7, 4], seed=5)]
    width = max(len(t) for t in samples)
    rows = torch.stack([torch.cat([torch.full((width - len(t),), PAD), t]) for t in samples])
    mask = torch.stack([torch.arange(width) >= width - len(t) for t in samples]).long()
    tok_idx = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    square = torch.logical_and(mask[:, None, None, :].bool(), mask[:, None, :, None].bool())
    logits = model(rows, square, tok_idx).logits
    assert torch.isfinite(logits).all()  # padding queries see only themselves: no NaN
    for row, tokens in enumerate(samples):
        alone = model(tokens[None]).logits[0]
        torch.testing.assert_close(logits[row, width - len(tokens):], alone, atol=1e-5, rtol=0)
    # The same batch with the HF-style [b, s] mask, positionally.
    key_only = model(rows, mask, tok_idx).logits
    for row, tokens in enumerate(samples):
        torch.testing.assert_close(key_only[row, width - len(tokens):],
                                   logits[row, width - len(tokens):], atol=1e-5, rtol=0)


@torch.no_grad()
def test_stale_positional_position_ids_are_refused():
    model = _model()
    batch = collate_rows([_samples([5, 6])], seq_length=12, pad_id=PAD)
    with pytest.raises(ValueError, match="position_ids"):
        model(batch.input_ids, batch.position_ids)  # the old (ids, positions, segments) order
    with pytest.raises(ValueError, match="boolean"):
        model(batch.input_ids, torch.zeros(1, 1, 12, 12))
