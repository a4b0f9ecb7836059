"""The model-FLOP count (monitoring/flops.py) against torch's own FLOP counter.

``FlopCounterMode`` counts every matmul the step really runs (forward and backward). Two gaps in
its table on CPU are filled with torch's own formulas: the CPU flash-attention kernel that SDPA
dispatches to (``sdpa_flop_count`` and its backward) and the in-place ``addmm_`` the masked
head accumulates its gradients with (``addmm_flop``).

Rows are unpacked (one sample per row, filling it), so SDPA's dense s x s work is exactly the
block-diagonal sum L^2 of the model-FLOP definition. Model FLOPs credit no recomputation, and
torch counts two recomputations this step really runs, each added to the expectation exactly:

* attention: the flash backward recomputes the scores QK^T (torch's backward formula counts 5
  matmuls, not 4): half of the forward attention FLOPs, once more;
* the head: with a plain head at the scored positions (``F.linear`` + CE: one forward GEMM, two
  backward) nothing more. The masked head computes logits twice in its forward by design
  (log-normaliser pass, then the gradient pass recomputes them) plus its two gradient GEMMs, also
  in forward: 4 head GEMMs where the model-FLOP definition counts 3, so one head forward
  (``head_flops``) more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import (
    FlopCounterMode, addmm_flop, sdpa_backward_flop_count, sdpa_flop_count)

from omnidiff.data.config import DiffusionConfig
from omnidiff.data.tokens.noising import noise_batch
from omnidiff.data.tokens.packing import TokenSample, collate_rows
from omnidiff.kernels.masked_head import masked_lm_loss
from omnidiff.monitoring.flops import (
    attention_flops, head_flops, micro_batch_flops, training_flops)
from omnidiff.parallel.config import ModelConfig, ParallelConfig
from omnidiff.parallel.model import build_model

aten = torch.ops.aten
VOCAB = 2048
SCORED = 150


def _cpu_attention_forward(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _addmm_inplace(out, mat1, mat2, *args, **kwargs) -> int:
    return addmm_flop(out, mat1, mat2)


# op -> formula over argument shapes (FlopCounterMode's shape convention)
CPU_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
    aten.addmm_: _addmm_inplace,
}


@pytest.fixture(scope="module", autouse=True)
def _world(single_process):
    yield


def _score_recompute(model_cfg: ModelConfig, rows: int, seq: int) -> int:
    """QK^T once more per layer in the flash backward: half the forward attention FLOPs."""
    return attention_flops(model_cfg, [seq] * rows) // 2


def _measured(model_cfg: ModelConfig, rows: int, seq: int, head: str) -> int:
    """FLOPs torch counts for forward + backward of the model and ``head`` at SCORED positions."""
    torch.manual_seed(0)
    model = build_model(model_cfg, ParallelConfig(), VOCAB)
    ids = torch.randint(0, VOCAB, (rows, seq))
    positions = torch.arange(seq).expand(rows, seq)
    segments = torch.ones(rows, seq, dtype=torch.long)  # one sample filling each row
    targets = torch.randint(0, VOCAB, (SCORED,))
    with FlopCounterMode(display=False, custom_mapping=CPU_FORMULAS) as counter:
        hidden = model(ids, positions, segments)
        selected = hidden.reshape(-1, model_cfg.hidden_size)[torch.randperm(rows * seq)[:SCORED]]
        weight = model.output_layer.weight
        if head == "plain":
            loss = F.cross_entropy(F.linear(selected, weight), targets)
        else:
            loss = masked_lm_loss(selected, weight, targets)
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("preset,rows,seq", [("tiny", 2, 128), ("small", 1, 256)])
def test_model_flops_equal_torch_count_with_a_plain_head(preset, rows, seq):
    model_cfg = ModelConfig(preset=preset)
    want = training_flops(model_cfg, VOCAB, [seq] * rows, SCORED)
    got = _measured(model_cfg, rows, seq, "plain")
    want += _score_recompute(model_cfg, rows, seq)
    assert abs(got - want) / want < 0.02, (got, want)


@pytest.mark.parametrize("preset,rows,seq", [("tiny", 2, 128), ("small", 1, 256)])
def test_masked_head_runs_model_flops_plus_one_recomputed_logits_pass(preset, rows, seq):
    model_cfg = ModelConfig(preset=preset)
    want = training_flops(model_cfg, VOCAB, [seq] * rows, SCORED)
    got = _measured(model_cfg, rows, seq, "masked") - _score_recompute(model_cfg, rows, seq)
    recompute = head_flops(model_cfg, VOCAB, SCORED)
    assert abs(got - (want + recompute)) / want < 0.02, (got, want, recompute)
    assert got - want > recompute / 2  # the extra pass is really there, not lost in noise


def test_packed_rows_count_attention_per_sample_only():
    model_cfg = ModelConfig(preset="tiny")
    per_square = 4 * model_cfg.num_attention_heads * model_cfg.head_dim * model_cfg.num_layers
    assert attention_flops(model_cfg, [3, 5]) == (9 + 25) * per_square
    targets = [torch.tensor([False, True, True]), torch.tensor([False, True, True, True, True])]
    row = [TokenSample(torch.arange(10, 10 + len(t)), t) for t in targets]
    packed = collate_rows([row], seq_length=10, pad_id=0)  # two samples and a padding tail
    batch = noise_batch(packed, DiffusionConfig(), mask_id=1,
                        generator=torch.Generator().manual_seed(0))
    tokens, flops = micro_batch_flops(model_cfg, VOCAB, [batch, batch])
    assert tokens == 20
    assert flops == 2 * training_flops(model_cfg, VOCAB, [3, 5], batch.num_masked)
