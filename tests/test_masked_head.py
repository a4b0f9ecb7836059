"""The chunked masked-position LM head agrees with the full-logits reference, at TP=1 and TP=2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnidiff.kernels.masked_head import masked_lm_loss, reference_lm_loss
from omnidiff.parallel import topology
from omnidiff.parallel.launcher import spawn

TOL = dict(rtol=1e-5, atol=1e-5)
N, HIDDEN, VOCAB = 41, 16, 50  # 41 positions: no chunk size below divides it


def _problem(seed: int, dtype: torch.dtype = torch.float32):
    """Hidden states for all positions, the full output weight, labels with ~half scored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).to(dtype)
    ids = torch.randint(0, VOCAB, (N,), generator=gen)
    scored = torch.rand(N, generator=gen) < 0.5
    token_weights = torch.rand(N, generator=gen)
    return hidden, weight, torch.where(scored, ids, -100), token_weights


def _fast(hidden, weight, labels, token_weights, **kw):
    """The fast path called the way the model calls it: gather the scored positions first."""
    scored = labels != -100
    return masked_lm_loss(hidden[scored], weight, labels[scored], token_weights[scored], **kw)


def _loss_and_grads(fn, hidden, weight, *args, grad_scale=1.0, need=(True, True), **kw):
    """Loss and gradients (None where not required) through fresh leaves."""
    hidden = hidden.detach().clone().requires_grad_(need[0])
    weight = weight.detach().clone().requires_grad_(need[1])
    loss = fn(hidden, weight, *args, **kw)
    if loss.requires_grad:
        (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def _plain_full_vocab(hidden, weight, labels, token_weights, grad_scale=1.0):
    """Independent TP=1 computation: torch's own CE on full logits, no omnidiff code."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    ce = F.cross_entropy(hidden @ weight.t(), labels, reduction="none", ignore_index=-100)
    loss = (ce * token_weights).sum()
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def _assert_all_close(got, want, **tol):
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        torch.testing.assert_close(a, b, **(tol or TOL), msg=lambda m: f"{name}: {m}")


@pytest.fixture(params=["plain", "megatron-tp1"])
def loss_backend(request, monkeypatch):
    """Without megatron set up (torch CE), and a world of one (megatron's vocab-parallel CE)."""
    if request.param == "megatron-tp1":
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key, raising=False)  # initialize() sets them; undone afterwards
        topology.initialize(tp=1)
        yield request.param
        topology.destroy()
    else:
        yield request.param


@pytest.mark.parametrize("vocab_block", [7, 50, 2048])  # 50 rows: blocks 7 (ragged), 1, 1
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_fast_matches_reference_tp1(loss_backend, chunk_size, vocab_block):
    problem = _problem(seed=chunk_size)
    want = _loss_and_grads(reference_lm_loss, *problem, grad_scale=0.37)
    got = _loss_and_grads(_fast, *problem, grad_scale=0.37, chunk_size=chunk_size,
                          vocab_block=vocab_block)
    _assert_all_close(got, want)
    _assert_all_close(want, _plain_full_vocab(*problem, grad_scale=0.37))


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)])
def test_partial_requires_grad(need):
    problem = _problem(seed=1)
    want = _loss_and_grads(reference_lm_loss, *problem, need=need)
    got = _loss_and_grads(_fast, *problem, need=need, chunk_size=6)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, **TOL)


def test_default_token_weights_and_no_scored_positions():
    hidden, weight, labels, _ = _problem(seed=2)
    scored = labels != -100
    torch.testing.assert_close(masked_lm_loss(hidden[scored], weight, labels[scored]),
                               reference_lm_loss(hidden, weight, labels), **TOL)
    none_scored = torch.full((N,), -100)
    loss, grad_h, grad_w = _loss_and_grads(_fast, hidden, weight, none_scored, torch.ones(N))
    assert loss == 0 and grad_h.abs().sum() == 0 and grad_w.abs().sum() == 0


def test_bf16_accumulates_in_fp32():
    """bf16 inputs: grads come back in bf16, close to the fp32 computation on the same values."""
    hidden, weight, labels, token_weights = _problem(seed=3, dtype=torch.bfloat16)
    got = _loss_and_grads(_fast, hidden, weight, labels, token_weights, chunk_size=5)
    want = _plain_full_vocab(hidden.float(), weight.float(), labels, token_weights)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    _assert_all_close([got[0], got[1].float(), got[2].float()], want, rtol=2e-2, atol=2e-2)


def test_backward_runs_once():
    hidden, weight, labels, token_weights = _problem(seed=4)
    loss = _fast(hidden.requires_grad_(), weight, labels, token_weights)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("case, message", [
    ("target", "target ids must lie in"),
    ("shape", "must be"),
    ("chunk", "chunk_size"),
    ("block", "vocab_block"),
    ("group", "tp_group"),
])
def test_bad_input_is_one_line_error(case, message):
    hidden, weight, labels, _ = _problem(seed=5)
    targets = labels.clamp_min(0)
    kwargs = {}
    if case == "target":
        targets[3] = VOCAB
    elif case == "shape":
        weight = weight[:, :-1]
    elif case == "chunk":
        kwargs["chunk_size"] = 0
    elif case == "block":
        kwargs["vocab_block"] = -1
    else:
        kwargs["tp_group"] = object()
    with pytest.raises(ValueError, match=message):
        masked_lm_loss(hidden, weight, targets, **kwargs)


def _tp2_worker() -> None:
    """Each rank holds half the vocab rows; both paths must equal the TP=1 full-weight result."""
    topology.initialize(tp=2)
    rank = torch.distributed.get_rank()
    rows = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
    try:
        for seed, chunk_size, vocab_block in ((10, 3, 4), (11, 64, 2048)):
            hidden, weight, labels, token_weights = _problem(seed)
            full = _plain_full_vocab(hidden, weight, labels, token_weights, grad_scale=1.7)
            want = (full[0], full[1], full[2][rows])
            shard = weight[rows]
            ref = _loss_and_grads(reference_lm_loss, hidden, shard, labels, token_weights,
                                  grad_scale=1.7)
            fast = _loss_and_grads(_fast, hidden, shard, labels, token_weights,
                                   grad_scale=1.7, chunk_size=chunk_size,
                                   vocab_block=vocab_block)
            _assert_all_close(fast, ref)
            _assert_all_close(ref, want)
            _assert_all_close(fast, want)
    finally:
        topology.destroy()


@pytest.mark.slow
def test_tp2_matches_full_vocab():
    spawn(_tp2_worker, 2)
