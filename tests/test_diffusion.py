"""The masked-diffusion objective: masking statistics against each mode's analytic rates."""

import pytest
import torch

from omnidiff.data.tokens.packing import TokenSample, collate_rows
from omnidiff.platform.config import DiffusionConfig
from omnidiff.data.tokens.noising import TailPadder, check_label_shift, noise_batch
from omnidiff.platform.objective import scored_positions

EOS, MASK = 0, 1


def _sample(prompt: int, target: int, pads: int = 0, token: int = 5) -> TokenSample:
    n = prompt + target + pads
    target_mask = torch.tensor([False] * prompt + [True] * (target + pads))
    tail = torch.tensor([False] * (prompt + target) + [True] * pads)
    tokens = torch.full((n,), token)
    tokens[prompt + target:] = EOS
    return TokenSample(tokens, target_mask, tail)


def _batch(rows=8, samples_per_row=4, prompt=10, target=40, pads=10):
    row = [_sample(prompt, target, pads, token=2 + i) for i in range(samples_per_row)]
    seq = samples_per_row * (prompt + target + pads) + 7  # unused tail
    return collate_rows([row] * rows, seq, EOS)


def test_per_token_rates_prompts_and_mask_id():
    batch, cfg = _batch(), DiffusionConfig(masking="per_token")
    targets = batch.target_mask & ~batch.tail_pad_mask
    pads = batch.tail_pad_mask
    rates_t, rates_p = [], []
    for seed in range(200):
        noised = noise_batch(batch, cfg, MASK, torch.Generator().manual_seed(seed))
        assert not (noised.loss_mask & ~batch.target_mask).any(), "a prompt or padding was masked"
        assert torch.equal(noised.input_ids[~noised.loss_mask], batch.input_ids[~noised.loss_mask])
        assert (noised.input_ids[noised.loss_mask] == MASK).all()
        rates_t.append(noised.loss_mask[targets].float().mean())
        rates_p.append(noised.loss_mask[pads].float().mean())
    expected = (1 - cfg.eps) / 2 + cfg.eps  # E[thr]
    assert torch.stack(rates_t).mean() == pytest.approx(expected, abs=0.005)
    assert torch.stack(rates_p).mean() == pytest.approx(0.6 * expected, abs=0.005)


def test_per_sequence_one_level_per_sample_and_mean_of_t():
    batch, cfg = _batch(rows=4, samples_per_row=4, target=400, pads=0), DiffusionConfig(
        masking="per_sequence")
    per_sample_rate, per_sample_t = [], []
    for seed in range(100):
        noised = noise_batch(batch, cfg, MASK, torch.Generator().manual_seed(seed))
        for r in range(batch.input_ids.shape[0]):
            for s in range(1, 5):
                in_sample = (batch.segment_ids[r] == s) & batch.target_mask[r]
                levels = noised.mask_level[r][in_sample]
                assert torch.all(levels == levels[0]), "t must be one value per sample"
                assert cfg.eps < levels[0] <= 1
                per_sample_t.append(levels[0])
                per_sample_rate.append(noised.loss_mask[r][in_sample].float().mean())
    rates, ts = torch.stack(per_sample_rate), torch.stack(per_sample_t)
    assert rates.mean() == pytest.approx((1 + cfg.eps) / 2, abs=0.02)  # E[t]
    assert (rates - ts).abs().mean() < 0.03  # each sample is masked at its own t


def test_importance_weight_and_normalisations():
    batch = _batch(rows=2)
    generator = lambda: torch.Generator().manual_seed(3)
    token = noise_batch(batch, DiffusionConfig(masking="per_token"), MASK, generator())
    assert token.loss_weights.sum() == pytest.approx(1.0, rel=1e-6)
    weighted = noise_batch(batch, DiffusionConfig(masking="per_sequence", importance_weighting=True),
                           MASK, generator())
    expected = (1 / weighted.mask_level[weighted.loss_mask]).sum() / weighted.num_masked
    assert weighted.loss_weights.sum() == pytest.approx(float(expected), rel=1e-5)
    sample = noise_batch(batch, DiffusionConfig(masking="per_token", loss_normalization="sample"),
                         MASK, generator())
    rates = []
    for r in range(2):
        for s in range(1, 5):
            in_sample = batch.segment_ids[r] == s
            rates.append(sample.loss_mask[r][in_sample].sum() / batch.target_mask[r][in_sample].sum())
    assert sample.loss_weights.sum() == pytest.approx(float(torch.stack(rates).mean()), rel=1e-5)


def test_deterministic_for_a_seed():
    batch, cfg = _batch(), DiffusionConfig()
    a = noise_batch(batch, cfg, MASK, torch.Generator().manual_seed(7))
    b = noise_batch(batch, cfg, MASK, torch.Generator().manual_seed(7))
    c = noise_batch(batch, cfg, MASK, torch.Generator().manual_seed(8))
    assert torch.equal(a.loss_mask, b.loss_mask) and not torch.equal(a.loss_mask, c.loss_mask)


def test_tail_pads_appended_only_without_eos():
    padder = TailPadder(EOS, max_pads=16, seed=0)
    counts = set()
    for _ in range(400):
        out = padder(_sample(5, 8))
        k = len(out) - 13
        counts.add(k)
        assert out.tokens[13:].eq(EOS).all() and out.target_mask[13:].all()
        assert out.tail_pad_mask.sum() == k and not out.tail_pad_mask[:13].any()
    assert counts == set(range(1, 17))
    has_eos = _sample(5, 8, pads=2)
    assert len(padder(has_eos)) == len(has_eos)


def test_label_shift_reads_the_previous_position():
    batch = _batch(rows=1)
    noised = noise_batch(batch, DiffusionConfig(), MASK, torch.Generator().manual_seed(0))
    rows, cols = scored_positions(noised, label_shift=False)
    rows_s, cols_s = scored_positions(noised, label_shift=True)
    assert torch.equal(rows, rows_s) and torch.equal(cols - 1, cols_s)
    # a target that starts its sample cannot be shifted: refused when the batch is noised
    rows_0, cols_0 = torch.cat([rows, torch.tensor([0])]), torch.cat([cols, torch.tensor([0])])
    with pytest.raises(ValueError, match="label shift"):
        check_label_shift(rows_0, cols_0, noised.segment_ids)
