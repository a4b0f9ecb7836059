"""Masked-position LM head with vocab-parallel cross-entropy, and the full-logits reference.

Masked diffusion scores only the masked targets (about half of them), and the output layer is
huge (176,264 rows), so the [tokens, vocab] logits dominate the step's memory.
:func:`masked_lm_loss` computes logits only at the scored positions, a [chunk, vocab block]
block at a time (two passes: log-normaliser, then gradients), and turns each block straight
into its hidden and weight gradients. :func:`reference_lm_loss` is the plain path (full logits
for every position, megatron-core's ``vocab_parallel_cross_entropy``, loss masked afterwards)
that the fast path is tested against.

Tensor parallelism follows megatron's output layer (``ColumnParallelLinear``,
``gather_output=False``): rank r holds vocab rows [r*V_local, (r+1)*V_local), ``hidden`` is
replicated, and its gradient is all-reduced over the TP group exactly once, by megatron's
``copy_to_tensor_model_parallel_region`` in front of the head. The fast path combines the
ranks' vocabulary shards with two small all-reduces per chunk (row max and sum of exponentials;
target logits), the same reduction megatron's vocab-parallel cross-entropy performs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from torch import Tensor
from torch.distributed import ProcessGroup

IGNORE_INDEX = -100
# Positions per chunk: every masked row of a micro-batch in one GEMM on CPU (1024 x h), and the
# vocabulary in blocks: one fp32 [1024, 1024] logits block is 4 MB, next to the 672 MB fp32
# weight gradient of a 176,264 x 1024 head (jobs/benchmarks/bench_masked_head.py).
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_VOCAB_BLOCK = 1024


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
    if ids.device.type != "cpu":
        return  # the range check reads values: a host sync; CPU batches were checked upstream
    vocab = weight.shape[0] * _tp_size(group)
    scored = ids[ids != IGNORE_INDEX] if ignore else ids
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= vocab):
        raise ValueError(f"target ids must lie in [0, {vocab}) (the full vocabulary), got "
                         f"[{int(scored.min())}, {int(scored.max())}]")


def _all_reduce(tensor: Tensor, op, group: ProcessGroup | None) -> Tensor:
    if _tp_size(group) > 1:
        torch.distributed.all_reduce(tensor, op=op, group=group)
    return tensor


def _blocks(weight: Tensor, block: int):
    for start in range(0, weight.shape[0], block):
        yield slice(start, start + block), weight[start:start + block]


def _log_normaliser(h_c: Tensor, weight: Tensor, block: int,
                    group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """log sum_v exp(h_c . W_v) over the full vocabulary, one [C, block] logits block at a time
    (online max/sum), combined over the TP ranks' vocabulary shards."""
    running_max = torch.full((h_c.shape[0],), float("-inf"), device=h_c.device)
    running_sum = torch.zeros(h_c.shape[0], device=h_c.device)
    for _, w_b in _blocks(weight, block):
        logits = (h_c @ w_b.t()).float()
        new_max = torch.maximum(running_max, logits.amax(dim=1))
        running_sum = (running_sum * torch.exp(running_max - new_max)
                       + logits.sub_(new_max[:, None]).exp_().sum(dim=1))
        running_max = new_max
    global_max = _all_reduce(running_max.clone(), torch.distributed.ReduceOp.MAX, group)
    total = _all_reduce(running_sum * torch.exp(running_max - global_max),
                        torch.distributed.ReduceOp.SUM, group)
    return global_max + total.log(), global_max


def _accumulate(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out (fp32) += a @ b: in place when a, b are fp32; else through an [a.rows, b.cols]
    temporary (a low-precision GEMM cannot write into an fp32 buffer)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += (a @ b).float()


def _local_targets(targets: Tensor, vocab_local: int, group: ProcessGroup | None):
    """(``[n]`` bool: target id in this rank's vocabulary shard, ``[n]`` local ids, clamped into
    the shard where not owned so every row can gather without a data-dependent shape)."""
    first = (0 if group is None else group.rank()) * vocab_local
    owned = (targets >= first) & (targets < first + vocab_local)
    return owned, (targets - first).clamp(0, vocab_local - 1)


class _ChunkedMaskedHead(torch.autograd.Function):
    """Loss and both gradients computed in forward, a [chunk, vocab_block] logits block at a time.

    Per chunk of positions, two passes over the vocabulary blocks: the first finds each row's
    log-normaliser (online max/sum, all-reduced over TP), the second recomputes each block's
    logits, turns them in place into softmax x token weight and accumulates
    grad_h += P W_b and grad_W[b] += P^T h_c into fp32 buffers; the target (one-hot) terms are
    added by the rank owning each target id. Only one small logits block is ever alive, and the
    GEMMs keep every masked row of the chunk (large, efficient shapes), so recomputing the
    logits once costs less than the reference's full-size softmax.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, token_weights: Tensor,
                chunk_size: int, vocab_block: int, group: ProcessGroup | None,
                stats: list | None) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fp32 = dict(dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, **fp32) if need_h else None
        grad_w = torch.zeros(weight.shape, **fp32) if need_w else None
        total = torch.zeros((), **fp32)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h_c, w_c = hidden[rows], token_weights[rows]
            log_z, top = _log_normaliser(h_c, weight, vocab_block, group)
            owned, local_ids = _local_targets(targets[rows], weight.shape[0], group)
            target_rows = weight[local_ids]  # [C, h]: the target's row (any row where not owned)
            target_logit = torch.where(owned, (h_c * target_rows).float().sum(dim=1), 0.0)
            _all_reduce(target_logit, torch.distributed.ReduceOp.SUM, group)
            total += ((log_z - target_logit) * w_c).sum()
            if stats is not None:  # per row: cross-entropy, and whether the target is the top
                stats.append((log_z - target_logit,
                              target_logit >= top - 1e-5 * (1 + top.abs())))
            if not (need_h or need_w):
                continue
            for block, w_b in _blocks(weight, vocab_block):
                probs = (h_c @ w_b.t()).float().sub_(log_z[:, None]).exp_().mul_(w_c[:, None])
                probs = probs.to(hidden.dtype)
                if need_h:
                    _accumulate(grad_h[rows], probs, w_b)
                if need_w:
                    _accumulate(grad_w[block], probs.t(), h_c)
            scaled = torch.where(owned, w_c, 0.0)[:, None]  # the one-hot term, owner rank only
            if need_h:
                grad_h[rows] -= target_rows.float() * scaled
            if need_w:
                grad_w.index_add_(0, local_ids, -(h_c.float() * scaled))
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
        return out[0], out[1], None, None, None, None, None, None


def masked_lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor,
                   token_weights: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   tp_group: ProcessGroup | None = None,
                   vocab_block: int = DEFAULT_VOCAB_BLOCK, stats: list | None = None) -> Tensor:
    """sum_i w_i * CE_i over the full vocabulary, from hidden states at scored positions only.

    ``hidden`` [n, h] (replicated over TP), ``weight`` [V_local, h] (this rank's vocab rows),
    ``targets`` [n] global ids. Never materialises more than [chunk_size, vocab_block] logits.
    The gradients are computed during forward, so backward may run only once. ``stats``, when
    given, receives ``(cross-entropy [c], target-is-top-1 [c])`` per chunk (no extra compute).
    """
    for name, value in (("chunk_size", chunk_size), ("vocab_block", vocab_block)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    group = resolve_tp_group(tp_group)
    _check_inputs(hidden, weight, targets, token_weights, group, ignore=False)
    weights = (torch.ones(targets.shape, device=hidden.device) if token_weights is None
               else token_weights.float())
    return _ChunkedMaskedHead.apply(_copy_to_tp_region(hidden, group), weight, targets,
                                    weights, chunk_size, vocab_block, group, stats)


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
