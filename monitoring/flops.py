"""Model FLOPs of a training step, counted exactly for this architecture.

Matrix multiplies only (norms, RoPE, softmax and the embedding lookup are left out, as in
Megatron's and PaLM's accounting), forward x 3 for forward + backward:

* per token and layer: q/k/v (GQA), output projection, SwiGLU's gate + up and down projections;
* per packed sample of length L and layer: QK^T and PV over the sample only (attention is
  block-diagonal, so a row of several samples costs sum L^2, not s^2);
* the output layer at the scored (masked) positions only, as the masked-position head runs it
  (once: the head recomputes the logits in its second pass, an implementation cost that MFU,
  like activation recomputation, does not credit).

``tests/test_flops.py`` checks this count against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

from collections.abc import Iterable

from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.data.tokens.packing import sample_lengths
from omnidiff.parallel.config import ModelConfig


def dense_flops_per_token(model: ModelConfig) -> int:
    """Forward FLOPs of one token through the layers' linear maps."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    per_layer = h * (q + 2 * kv) + q * h + 2 * h * f + f * h
    return 2 * per_layer * model.num_layers


def attention_flops(model: ModelConfig, sample_lengths: Iterable[int]) -> int:
    """Forward FLOPs of QK^T and PV for packed samples of these lengths."""
    squares = sum(length * length for length in sample_lengths)
    return 4 * squares * model.num_attention_heads * model.head_dim * model.num_layers


def head_flops(model: ModelConfig, vocab_size: int, scored_tokens: int) -> int:
    """Forward FLOPs of the output layer at the scored positions."""
    return 2 * model.hidden_size * vocab_size * scored_tokens


def training_flops(model: ModelConfig, vocab_size: int, sample_lengths: Iterable[int],
                   scored_tokens: int) -> int:
    """Model FLOPs (forward + backward) of one step over packed samples of these lengths."""
    lengths = list(sample_lengths)
    forward = (dense_flops_per_token(model) * sum(lengths) + attention_flops(model, lengths)
               + head_flops(model, vocab_size, scored_tokens))
    return 3 * forward


def micro_batch_flops(model: ModelConfig, vocab_size: int,
                      micro_batches: Iterable[NoisedBatch]) -> tuple[int, int]:
    """``(tokens, model FLOPs)`` of one rank's micro-batches (packed rows, masked positions)."""
    batches = list(micro_batches)
    lengths = [n for b in batches for n in sample_lengths(b.segment_ids)]
    masked = sum(b.num_masked for b in batches)
    tokens = sum(b.input_ids.numel() for b in batches)
    return tokens, training_flops(model, vocab_size, lengths, masked)
