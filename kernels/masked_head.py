"""Masked-position LM head with vocab-parallel cross-entropy, and the full-logits reference.

Masked diffusion scores only the masked targets (about half of them), and the output layer is
huge (176,264 rows), so the [tokens, vocab] logits dominate the step's memory.
:func:`masked_lm_loss` computes logits only at the scored positions, a chunk at a time, and
turns each chunk straight into its hidden and weight gradients, so at most one
[chunk, V_local] logits block is alive. :func:`reference_lm_loss` is the plain path (full
logits for every position, loss masked afterwards) that the fast path is tested against.

Tensor parallelism follows megatron's output layer (``ColumnParallelLinear``,
``gather_output=False``): rank r holds vocab rows [r*V_local, (r+1)*V_local), ``hidden`` is
replicated, and its gradient is all-reduced over the TP group exactly once, by megatron's
``copy_to_tensor_model_parallel_region`` in front of the head. The loss is megatron-core's
``vocab_parallel_cross_entropy`` in both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from torch import Tensor
from torch.distributed import ProcessGroup

IGNORE_INDEX = -100
# One fp32 [64, 176_264] logits block is 45 MB, small next to the fp32 weight gradient
# (V_local x h); below 64 rows the CPU GEMMs lose much of their speed
# (jobs/benchmarks/bench_masked_head.py). GPUs want larger chunks (~512+) to stay compute-bound.
DEFAULT_CHUNK_SIZE = 64


def resolve_tp_group(tp_group: ProcessGroup | None = None) -> ProcessGroup | None:
    """The TP group the loss reduces over: megatron's when initialised, else None (one process).

    megatron-core 0.16.1's ``vocab_parallel_cross_entropy`` has no group argument (it always
    reduces over ``parallel_state``'s TP group), so an explicit group must be that one.
    """
    default = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    if tp_group is not None and tp_group is not default:
        raise ValueError("tp_group must be megatron parallel_state's tensor-parallel group "
                         "(megatron-core's vocab_parallel_cross_entropy reduces over it only)")
    return default


def _tp_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else group.size()


def _token_cross_entropy(logits: Tensor, targets: Tensor, group: ProcessGroup | None) -> Tensor:
    """Per-token CE over the full (all-rank) vocabulary, in fp32.

    With megatron's TP group this is ``vocab_parallel_cross_entropy`` (which also runs at TP=1);
    before ``parallel_state`` exists there is no sharding, and torch's CE is the same quantity.
    """
    if group is None:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    return tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


def _copy_to_tp_region(hidden: Tensor, group: ProcessGroup | None) -> Tensor:
    """Identity forward, all-reduce of the gradient over TP backward (ColumnParallelLinear)."""
    if _tp_size(group) == 1:
        return hidden
    return tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group)


def _check_inputs(hidden: Tensor, weight: Tensor, ids: Tensor, token_weights: Tensor | None,
                  group: ProcessGroup | None, ignore: bool) -> None:
    """One-line errors for mismatched shapes/dtypes and out-of-range vocab ids."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         "[n, h] and [V_local, h] with the same h")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} differs from weight dtype {weight.dtype}")
    if ids.dtype != torch.long or ids.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be a long tensor of shape [{hidden.shape[0]}], got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    if token_weights is not None and token_weights.shape != ids.shape:
        raise ValueError(f"token_weights shape {tuple(token_weights.shape)} must equal "
                         f"targets shape {tuple(ids.shape)}")
    vocab = weight.shape[0] * _tp_size(group)
    scored = ids[ids != IGNORE_INDEX] if ignore else ids
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= vocab):
        raise ValueError(f"target ids must lie in [0, {vocab}) (the full vocabulary), got "
                         f"[{int(scored.min())}, {int(scored.max())}]")


def _accumulate_weight_grad(grad_w: Tensor, g: Tensor, h_c: Tensor) -> None:
    """grad_w (fp32) += g^T h_c without a [V_local, h] temporary.

    fp32 accumulates in place (addmm_). Low-precision GEMMs cannot write into an fp32 buffer,
    so they run over vocab blocks whose [block, h] product is no larger than the chunk's logits.
    """
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h_c)
        return
    block = max(1, g.numel() // h_c.shape[1])
    for start in range(0, grad_w.shape[0], block):
        grad_w[start:start + block] += g[:, start:start + block].t() @ h_c


class _ChunkedMaskedHead(torch.autograd.Function):
    """Loss and both gradients computed chunk by chunk in forward; backward only rescales.

    Per chunk: logits = h_c W^T (no graph), d(sum_i w_i CE_i)/d logits through megatron's CE via
    ``torch.autograd.grad``, then grad_h[c] = g W and grad_W += g^T h_c into fp32 buffers. The
    weight gradient is accumulated in place (addmm) rather than via autograd.grad on W, which
    would allocate a second [V_local, h] tensor per chunk.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, token_weights: Tensor,
                chunk_size: int, group: ProcessGroup | None) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fp32 = dict(dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, **fp32) if need_h else None
        grad_w = torch.zeros(weight.shape, **fp32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h_c, w_c = hidden[rows], token_weights[rows]
            logits = h_c @ weight.t()
            if not (need_h or need_w):
                total += (_token_cross_entropy(logits, targets[rows], group) * w_c).sum()
                continue
            with torch.enable_grad():
                logits.requires_grad_(True)
                loss_c = (_token_cross_entropy(logits, targets[rows], group) * w_c).sum()
                (g,) = torch.autograd.grad(loss_c, logits)
            total += loss_c.detach()
            del logits, loss_c  # only g (megatron's in-place softmax buffer) outlives the CE
            if need_h:
                grad_h[rows] = g @ weight
            if need_w:
                _accumulate_weight_grad(grad_w, g, h_c)
            del g
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.grads is None:
            raise RuntimeError("masked_lm_loss: backward can run only once per forward")
        grads, ctx.grads = ctx.grads, None  # drop ctx's reference so autograd can adopt them
        out = [None if g is None else g.mul_(grad_loss).to(dtype)
               for g, dtype in zip(grads, ctx.dtypes)]
        del grads
        return out[0], out[1], None, None, None, None


def masked_lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor,
                   token_weights: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   tp_group: ProcessGroup | None = None) -> Tensor:
    """sum_i w_i * CE_i over the full vocabulary, from hidden states at scored positions only.

    ``hidden`` [n, h] (replicated over TP), ``weight`` [V_local, h] (this rank's vocab rows),
    ``targets`` [n] global ids. Never materialises more than [chunk_size, V_local] logits.
    The gradients are computed during forward, so backward may run only once.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    group = resolve_tp_group(tp_group)
    _check_inputs(hidden, weight, targets, token_weights, group, ignore=False)
    weights = (torch.ones(targets.shape, device=hidden.device) if token_weights is None
               else token_weights.float())
    return _ChunkedMaskedHead.apply(_copy_to_tp_region(hidden, group), weight, targets,
                                    weights, chunk_size, group)


def reference_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor,
                      token_weights: Tensor | None = None,
                      tp_group: ProcessGroup | None = None) -> Tensor:
    """The plain path: logits for all N positions, per-token CE, loss kept where labels != -100."""
    group = resolve_tp_group(tp_group)
    _check_inputs(hidden, weight, labels, token_weights, group, ignore=True)
    scored = labels != IGNORE_INDEX
    weights = scored.float() if token_weights is None else token_weights.float() * scored
    logits = F.linear(_copy_to_tp_region(hidden, group), weight)
    ce = _token_cross_entropy(logits, torch.where(scored, labels, 0), group)
    return (ce * weights).sum()
