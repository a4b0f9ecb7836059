"""The DeepSpeed engine on TP (with sequence parallelism), DP (ZeRO-1/2/3) and TP x DP matches one
plain process: same losses, gradient norms and weights after 5 optimizer steps of the same
global batches, from the same initial weights (fp32, gloo, 2-layer tiny model).

The reference is :class:`LocalEngine` (plain PyTorch, torch's own clip_grad_norm_) in this
process; each parallel layout runs in spawned workers that save their results for comparison.
"""

import math

import pytest
import torch
import torch.distributed as dist

from omnidiff.parallel import topology
from omnidiff.parallel.launcher import spawn
from harness.parity import (
    global_batches,
    load_worker_results,
    local_share,
    max_relative_difference,
    parity_config,
    run_parity,
    vocab_rows,
    with_nan_loss,
)
from omnidiff.parallel.resharding import gather_full_state_dict, layout_of
from omnidiff.parallel.engines.base import NonFiniteError
from omnidiff.parallel.engines.local import LocalEngine

RTOL = 1e-5
TP2_SP = ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true")


def _relative(got: list[float], want: list[float]) -> float:
    return max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))


def _check_nonfinite_steps(engine, micro_batches, dims) -> None:
    """NaN loss on the last DP rank only: every rank skips the step (no weight, Adam or lr
    change) and counts it; a good step resets the streak; ``limit`` in a row stop the run."""
    engine.guard.limit = 3
    good = local_share(micro_batches, dims)
    bad = [with_nan_loss(b) for b in good] if dims.dp_rank == dims.dp - 1 else good
    before, lr_step = gather_full_state_dict(engine.model), engine.scheduler.last_epoch
    for count in (1, 2):
        result = engine.train_step(bad)
        assert result.skipped and not math.isfinite(result.loss)
        assert engine.guard.total == count and engine.guard.in_a_row == count
    after = gather_full_state_dict(engine.model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert engine.scheduler.last_epoch == lr_step
    assert not engine.train_step(good).skipped and engine.guard.in_a_row == 0
    engine.train_step(bad), engine.train_step(bad)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row had a non-finite loss"):
        engine.train_step(bad)
    assert engine.guard.total == 5


def _worker(out: str, tp: int, layouts: dict[str, tuple[str, ...]], nan_check: str) -> None:
    dims = topology.initialize(tp=tp)
    try:
        results = {}
        for name, overrides in layouts.items():
            cfg = parity_config(*overrides)
            batches = global_batches(cfg)
            results[name], engine = run_parity(cfg, dims, batches, vocab_rows(cfg, 2))
            if name == nan_check:
                _check_nonfinite_steps(engine, batches[0], dims)
        if dist.get_rank() == 0:
            torch.save(results, out)
    finally:
        topology.destroy()


def _spawn_layouts(tmp_path_factory, nprocs: int, tp: int, layouts: dict, nan_check: str = ""):
    out = str(tmp_path_factory.mktemp("parity") / "results.pt")
    spawn(_worker, nprocs, out, tp, layouts, nan_check)
    return load_worker_results(out)


@pytest.fixture(scope="module")
def reference():
    """TP=1 x DP=1 in this process, plus the share of the gradient norm held by replicated
    (not TP-sharded) weights: what double counting them under TP=2 would change."""
    dims = topology.initialize(tp=1)
    try:
        cfg = parity_config()
        result, engine = run_parity(cfg, dims, global_batches(cfg), vocab_rows(cfg, 2))
        assert isinstance(engine, LocalEngine)
        grads = {n: p.grad.double() for n, p in engine.model.named_parameters()}
    finally:
        topology.destroy()
    replicated = sum(g.square().sum() for n, g in grads.items() if layout_of(n).dim is None)
    total = sum(g.square().sum() for g in grads.values())
    return result, math.sqrt(1 + float(replicated / total)) - 1


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    return _spawn_layouts(tmp_path_factory, 2, 2, {"tp2_sp": TP2_SP}, nan_check="tp2_sp")["tp2_sp"]


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    layouts = {f"zero{s}": (f"parallel.zero_stage={s}",) for s in (1, 2, 3)}
    return _spawn_layouts(tmp_path_factory, 2, 1, layouts, nan_check="zero2")


def _assert_matches(got, reference_result) -> None:
    assert got.initial.keys() == reference_result.initial.keys()
    # Same seed, sharded build: the shards are exactly slices of the TP=1 weights.
    assert max_relative_difference(got.initial, reference_result.initial) == 0.0
    assert _relative(got.losses, reference_result.losses) < RTOL
    assert _relative(got.grad_norms, reference_result.grad_norms) < RTOL
    assert max_relative_difference(got.final, reference_result.final) < RTOL
    # ... and the comparison is not vacuous: the weights moved, clipping was active.
    assert max_relative_difference(reference_result.final, reference_result.initial) > 0.1
    assert min(reference_result.grad_norms) > 1.0


@pytest.mark.slow
def test_tp2_sequence_parallel_matches_tp1(tp2, reference):
    _assert_matches(tp2, reference[0])


@pytest.mark.slow
def test_tp2_grad_norm_counts_replicated_weights_once(tp2, reference):
    result, double_count_error = reference
    assert _relative(tp2.grad_norms, result.grad_norms) < RTOL
    assert double_count_error > 10 * RTOL  # counting norms on both TP ranks would be caught


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dp2_zero_matches_dp1(dp2, reference, stage):
    _assert_matches(dp2[f"zero{stage}"], reference[0])


@pytest.mark.slow
def test_tp2_x_dp2_matches_tp1_x_dp1(tmp_path_factory, reference):
    layouts = {"tp2_dp2": (*TP2_SP, "parallel.zero_stage=2")}
    _assert_matches(_spawn_layouts(tmp_path_factory, 4, 2, layouts)["tp2_dp2"], reference[0])


def test_local_engine_skips_and_stops_on_nonfinite_loss():
    dims = topology.initialize(tp=1)
    try:
        cfg = parity_config()
        batches = global_batches(cfg)
        _, engine = run_parity(cfg, dims, batches[:1], vocab_rows(cfg, 2))
        _check_nonfinite_steps(engine, batches[1], dims)
    finally:
        topology.destroy()
