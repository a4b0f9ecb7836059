"""The megatron-core model: size at Dream-7B shape, packing semantics, the portable kernels."""

import pytest
import torch

from omnidiff.kernels.attention import PackedSDPAttention, block_diagonal_mask, reference_attention
from omnidiff.kernels.rmsnorm import RMSNorm, reference_rms_norm
from omnidiff.parallel import topology
from omnidiff.platform.config import load_config
from omnidiff.parallel.model import build_model, count_parameters, transformer_config


def test_dream_7b_on_meta_device(single_process):
    cfg = load_config(None, ["model.preset=dream-7b"])
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.parallel, vocab_size=176_264,
                            perform_initialization=False)
    assert count_parameters(model) == pytest.approx(7.79e9, rel=0.01)
    assert all(p.is_meta for p in model.parameters())


def _tiny(vocab=300):
    cfg = load_config(None, ["model.num_layers=2"])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.parallel, vocab).eval()


def test_packed_samples_equal_samples_alone(single_process):
    model = _tiny()
    lengths = (7, 12, 5)
    samples = [torch.randint(0, 300, (n,)) for n in lengths]
    seq = sum(lengths) + 4  # padding tail
    ids = torch.zeros(1, seq, dtype=torch.long)
    seg = torch.zeros(1, seq, dtype=torch.long)
    pos = torch.zeros(1, seq, dtype=torch.long)
    start = 0
    for index, sample in enumerate(samples, start=1):
        ids[0, start:start + len(sample)] = sample
        seg[0, start:start + len(sample)] = index
        pos[0, start:start + len(sample)] = torch.arange(len(sample))
        start += len(sample)
    with torch.no_grad():
        packed = model.logits(model(ids, pos, seg))[:, 0]
        start = 0
        for sample in samples:
            n = len(sample)
            alone = model.logits(model(sample[None], torch.arange(n)[None],
                                       torch.ones(1, n, dtype=torch.long)))[:, 0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_attention_is_bidirectional(single_process):
    model = _tiny()
    ids = torch.randint(0, 300, (1, 10))
    pos, seg = torch.arange(10)[None], torch.ones(1, 10, dtype=torch.long)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 300
    with torch.no_grad():
        first = model(ids, pos, seg)[0]
        second = model(changed, pos, seg)[0]
    assert not torch.allclose(first, second), "the first position must see the last token"


def test_portable_attention_matches_reference():
    cfg = load_config(None, [])
    config = transformer_config(cfg.model, cfg.parallel)
    attention = PackedSDPAttention(config, 1, None, "self")
    s, b, heads, groups, d = 9, 2, 4, 2, 16
    q, k, v = torch.randn(s, b, heads, d), torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    segments = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    mask = block_diagonal_mask(segments)
    out = attention(q, k, v, mask)
    ref = reference_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), mask)
    torch.testing.assert_close(out, ref.permute(2, 0, 1, 3).reshape(s, b, heads * d),
                               atol=1e-5, rtol=1e-5)


def test_rmsnorm_matches_reference_and_is_tagged_for_sequence_parallel():
    cfg = load_config(None, [])
    config = transformer_config(cfg.model, cfg.parallel)
    config.sequence_parallel = True
    norm = RMSNorm(config, 16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 16)
    expected = norm.weight * (x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(reference_rms_norm(x, norm.weight, 1e-6), expected)
    assert norm.weight.sequence_parallel is True
