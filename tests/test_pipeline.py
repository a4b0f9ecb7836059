"""Pipeline parallelism (DeepSpeed PipelineModule, 1F1B) against the single-process engine."""

import io
from pathlib import Path

import pytest
import torch

from harness.parity import load_worker_results
from omnidiff.data.tokens.packing import PackedBatch
from omnidiff.parallel import topology
from omnidiff.parallel.launcher import spawn
from omnidiff.parallel.engines import build_engine
from omnidiff.parallel.engines.local import LocalEngine
from omnidiff.parallel.engines.pipeline import OrderedBuilder
from omnidiff.platform.config import ConfigError, load_config
from omnidiff.data.tokens.noising import NoisedBatch, noise_batch
from omnidiff.parallel.model import build_model
from omnidiff.platform.objective import DiffusionObjective

VOCAB = 384
MASK_ID = VOCAB - 1
SEQ = 48
MICRO_BATCH = 2
MICRO_BATCHES = 4
STEPS = 5
RESUME_AT = 3


def _config(pp: int, tp: int = 1):
    return load_config(None, [
        "model.preset=tiny", "seed=7", f"parallel.pipeline_parallel={pp}",
        f"parallel.tensor_parallel={tp}", f"parallel.sequence_parallel={str(tp > 1).lower()}",
        "parallel.precision=fp32", f"data.seq_length={SEQ}",
        f"data.micro_batch_size={MICRO_BATCH}",
        f"data.global_batch_size={MICRO_BATCH * MICRO_BATCHES}",
        "optimizer.lr=3e-3", "optimizer.weight_decay=0.1", "optimizer.grad_clip=1.0",
        f"schedule.train_steps={STEPS}", "schedule.warmup_fraction=0.2",
        "diffusion.head_chunk_size=16",
    ])


def _packed(generator: torch.Generator) -> PackedBatch:
    """Rows of 2-3 samples (4-token prompt, then targets) and a padding tail."""
    shape = (MICRO_BATCH, SEQ)
    ids = torch.randint(0, MASK_ID, shape, generator=generator)
    segments = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    targets = torch.zeros(shape, dtype=torch.bool)
    for row in range(MICRO_BATCH):
        start = 0
        for index in range(1, 2 + row + 1):
            length = int(torch.randint(8, 15, (1,), generator=generator))
            segments[row, start:start + length] = index
            positions[row, start:start + length] = torch.arange(length)
            targets[row, start + 4:start + length] = True
            start += length
    return PackedBatch(ids, targets, torch.zeros(shape, dtype=torch.bool), segments, positions)


def _micro_batches(cfg, step: int) -> list[NoisedBatch]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [noise_batch(_packed(generator), cfg.diffusion, MASK_ID, generator)
            for _ in range(MICRO_BATCHES)]


def _snapshot(state: dict) -> dict:
    """A deep copy through torch.save, as a checkpoint would take it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # engine states load without pickle code


def _pipeline_worker(out_dir: str, tp: int) -> None:
    """5 steps; with TP = 1 then a fresh engine resumed from the step-3 state redoes steps 4-5,
    then a step with NaN loss weights, which must be skipped. TP = 2 runs sequence-parallel."""
    dims = topology.initialize(tp=tp, pp=2)
    try:
        cfg = _config(pp=2, tp=tp)
        engine = build_engine(cfg, dims, VOCAB, DiffusionObjective(cfg.diffusion))
        results = []
        for step in range(STEPS):
            if step == RESUME_AT:
                saved = _snapshot(engine.state_dict())
            results.append(engine.train_step(_micro_batches(cfg, step)))
        out = {"results": results, "model": _snapshot(engine.state_dict())["model"]}
        if tp == 1:
            resumed = build_engine(cfg, dims, VOCAB, DiffusionObjective(cfg.diffusion))
            resumed.load_state_dict(saved)
            out["resumed"] = [resumed.train_step(_micro_batches(cfg, step))
                              for step in range(RESUME_AT, STEPS)]
            out["resumed_model"] = _snapshot(resumed.state_dict())["model"]
            bad = _micro_batches(cfg, STEPS)
            bad[1].loss_weights[bad[1].loss_mask] = float("nan")
            out["bad"] = resumed.train_step(bad)
            out["after_bad"] = _snapshot(resumed.state_dict())
        torch.save(out, Path(out_dir) / f"rank{torch.distributed.get_rank()}.pt")
    finally:
        topology.destroy()


def _reference():
    topology.initialize(tp=1)
    try:
        cfg = _config(pp=1)
        torch.manual_seed(cfg.seed)
        engine = LocalEngine(build_model(cfg.model, cfg.parallel, VOCAB), cfg,
                             DiffusionObjective(cfg.diffusion), MICRO_BATCHES,
                             torch.device("cpu"))
        results = [engine.train_step(_micro_batches(cfg, step)) for step in range(STEPS)]
        return results, engine.model.state_dict()
    finally:
        topology.destroy()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _key_bias(cfg) -> torch.Tensor:
    """Which entries of ``linear_qkv.bias`` are key biases (megatron: [q..., k, v] per group)."""
    model = cfg.model
    per_group = model.num_attention_heads // model.num_query_groups
    roles = torch.tensor(([0] * per_group + [1, 2]) * model.num_query_groups)
    return roles.repeat_interleave(model.head_dim) == 1


def _assert_parameters_agree(got: dict, want: dict, cfg) -> None:
    for name, value in got.items():
        if not isinstance(value, torch.Tensor):
            continue  # megatron's empty _extra_state
        expected = want[name]
        if name.endswith("linear_qkv.bias"):
            # Softmax ignores a per-query shift, so the key bias has zero gradient in exact
            # arithmetic and Adam normalises rounding noise there: compare it absolutely.
            keys = _key_bias(cfg)
            assert float((value[keys] - expected[keys]).abs().max()) < 1e-5, name
            value, expected = value[~keys], expected[~keys]
        assert _relative(value, expected) < 1e-5, name


def _assert_steps_agree(got, want) -> None:
    for mine, theirs in zip(got, want, strict=True):
        assert mine.loss == pytest.approx(theirs.loss, rel=1e-5)
        assert mine.grad_norm == pytest.approx(theirs.grad_norm, rel=1e-5)
        assert mine.lr == pytest.approx(theirs.lr, rel=1e-12)
        assert not mine.skipped
        assert mine.num_masked == theirs.num_masked


@pytest.mark.slow
def test_pp2_with_4_micro_batches_matches_pp1_and_resumes(tmp_path):
    spawn(_pipeline_worker, 2, str(tmp_path), 1)
    shards = [load_worker_results(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected, reference = _reference()
    cfg = _config(pp=1)

    for shard in shards:  # both stages report the same step results
        _assert_steps_agree(shard["results"], expected)
    assert expected[0].grad_norm > 1.0  # clipping is exercised, and so the global norm

    stage0, stage1 = (shard["model"] for shard in shards)
    assert not set(stage0) & set(stage1)
    assert set(stage0) | set(stage1) == set(reference)
    assert "embedding.weight" in stage0 and "output_layer.weight" in stage1
    assert "decoder.final_layernorm.weight" in stage1
    assert {k.split(".")[2] for k in stage1 if k.startswith("decoder.layers.")} == {"2", "3"}
    _assert_parameters_agree({**stage0, **stage1}, reference, cfg)

    for shard in shards:
        # Resumed from the step-3 state: the same steps, bit for bit.
        assert [r.loss for r in shard["resumed"]] == [r.loss for r in shard["results"][RESUME_AT:]]
        for name, value in shard["resumed_model"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, shard["model"][name]), name
        # A NaN loss skips the update on every stage and is counted.
        bad = shard["bad"]
        assert bad.skipped and bad.loss != bad.loss
        assert shard["after_bad"]["guard"]["total"] == 1
        for name, value in shard["after_bad"]["model"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, shard["resumed_model"][name]), name


@pytest.mark.slow
def test_tp2_x_pp2_matches_pp1(tmp_path):
    spawn(_pipeline_worker, 4, str(tmp_path), 2)
    expected, _ = _reference()
    for rank in range(4):
        shard = load_worker_results(tmp_path / f"rank{rank}.pt")
        _assert_steps_agree(shard["results"], expected)


def test_ordered_builder_replays_the_construction_order():
    def sequential():
        torch.manual_seed(3)
        return [torch.nn.Linear(4, 4) for _ in range(3)]

    builder = OrderedBuilder([lambda: torch.nn.Linear(4, 4)] * 3)
    torch.manual_seed(3)
    third = builder.build(2)  # layers 0 and 1 are built and dropped first
    assert torch.equal(third.weight, sequential()[2].weight)
    with pytest.raises(RuntimeError, match="increasing order"):
        builder.build(1)


def test_pipeline_engine_needs_the_pipeline_topology():
    dims = topology.initialize(tp=1)
    try:
        cfg = _config(pp=2)
        with pytest.raises(ConfigError, match="pipeline_parallel=2"):
            build_engine(cfg, dims, VOCAB, DiffusionObjective(cfg.diffusion))
    finally:
        topology.destroy()
