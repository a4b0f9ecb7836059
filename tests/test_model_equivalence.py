"""The megatron-core model and the HF class compute the same function on the same weights.

The HF class is written independently in plain PyTorch (its own RoPE, mask, norm, GQA), so this
checks the megatron-core assembly (layer spec, fused QKV layout, RoPE angles, block-diagonal mask)
and the weight conversion in both directions, on a packed batch with a padding tail.
"""

from __future__ import annotations

import pytest
import torch

from omnidiff.data.tokens.packing import TokenSample, collate_rows
from omnidiff.parallel import topology
from omnidiff.platform.config import ModelConfig, ParallelConfig
from omnidiff.platform.hf_convert import hf_config_from, hf_to_megatron, megatron_to_hf
from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion
from omnidiff.parallel.model import build_model

VOCAB = 104  # a multiple of 8, as the padded embedding
PAD = 0
MODEL = ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_attention_heads=8,
                    num_query_groups=2, ffn_hidden_size=96, rope_theta=10_000.0)


@pytest.fixture(scope="module", autouse=True)
def _single_process_megatron(single_process):
    yield


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norms and biases (they initialise to 1 / 0), so every tensor's layout matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=g) * 0.2)


def _packed_batch():
    g = torch.Generator().manual_seed(3)
    rows = [[5, 9, 4], [12, 6]]  # sample lengths; both rows end in padding
    samples = [[TokenSample(torch.randint(1, VOCAB, (n,), generator=g),
                            torch.ones(n, dtype=torch.bool)) for n in row] for row in rows]
    return collate_rows(samples, seq_length=24, pad_id=PAD)


def _hf_model(state: dict[str, torch.Tensor] | None = None) -> OmniDiffusionForMaskedDiffusion:
    model = OmniDiffusionForMaskedDiffusion(
        hf_config_from(MODEL, VOCAB, mask_token_id=3, pad_token_id=PAD)).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def _megatron_logits(model, batch) -> torch.Tensor:
    hidden = model(batch.input_ids, batch.position_ids, batch.segment_ids)
    return model.logits(hidden).transpose(0, 1)  # [s, b, V] -> [b, s, V]


@torch.no_grad()
def _assert_same_logits(megatron_model, hf_model) -> None:
    batch = _packed_batch()
    expected = hf_model(batch.input_ids, position_ids=batch.position_ids,
                        segment_ids=batch.segment_ids).logits
    got = _megatron_logits(megatron_model, batch)
    real = batch.segment_ids > 0  # the padding tail's outputs are never used
    assert got.shape == expected.shape == (2, 24, VOCAB)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_megatron_weights_in_the_hf_class_give_the_same_logits():
    torch.manual_seed(0)
    megatron_model = build_model(MODEL, ParallelConfig(), VOCAB).eval()
    _perturb(megatron_model, seed=1)
    _assert_same_logits(megatron_model, _hf_model(megatron_to_hf(megatron_model.state_dict(),
                                                                 MODEL)))


def test_hf_weights_in_the_megatron_model_give_the_same_logits():
    torch.manual_seed(0)
    hf_model = _hf_model()
    _perturb(hf_model, seed=2)
    megatron_model = build_model(MODEL, ParallelConfig(), VOCAB,
                                 perform_initialization=False).eval()
    missing, unexpected = megatron_model.load_state_dict(
        hf_to_megatron(hf_model.state_dict(), MODEL), strict=False)
    assert not unexpected
    assert all(key.endswith("._extra_state") for key in missing), missing
    _assert_same_logits(megatron_model, hf_model)
