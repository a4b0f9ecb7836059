"""Topology layouts, the DeepSpeed mpu adapter, the CPU RNG tracker and TP resharding (one
process; the multi-process checks are in test_parallel_engine.py)."""

import pytest
import torch

from omnidiff.parallel import resharding, topology
from omnidiff.parallel.mpu import MegatronMPU
from omnidiff.parallel.resharding import (
    Layout,
    ReshardingError,
    layout_of,
    merge_state_dicts,
    shard,
    split_state_dict,
    unshard,
)
from omnidiff.parallel.dims import ParallelDims, rank_groups
from omnidiff.platform.config import load_config
from omnidiff.parallel.model import build_model


def test_rank_groups_put_tp_fastest_then_dp_then_pp():
    groups = rank_groups(ParallelDims(8, tp=2, pp=2))
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert rank_groups(ParallelDims(4, tp=2))["dp"] == [[0, 2], [1, 3]]


def test_mpu_adapter_answers_deepspeed(single_process):
    mpu = MegatronMPU(single_process)
    assert mpu.get_model_parallel_rank() == 0 and mpu.get_model_parallel_world_size() == 1
    assert mpu.get_data_parallel_group_ranks() == [0]
    assert mpu.get_tensor_model_parallel_world_size() == 1
    # DeepSpeed turns on its Ulysses layout when these exist: they must not.
    assert not hasattr(mpu, "get_sequence_parallel_world_size")
    assert not hasattr(mpu, "initialize_sequence_parallel")


def test_cpu_rng_tracker_forks_per_tp_rank_states(single_process):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    draws = []
    for tp_rank in (0, 1, 0):
        topology.seed(7)
        model_parallel_cuda_manual_seed(7, tp_rank=tp_rank)
        outer = torch.get_rng_state()
        with get_cuda_rng_tracker().fork():
            draws.append(torch.rand(4))
        assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_fc1_shards_hold_gate_and_up_slices():
    f, h, tp = 6, 2, 2
    gate = torch.arange(f * h, dtype=torch.float32).reshape(f, h)
    up = 100 + gate
    full = torch.cat([gate, up])
    for rank in range(tp):
        rows = slice(rank * f // tp, (rank + 1) * f // tp)
        expected = torch.cat([gate[rows], up[rows]])
        assert torch.equal(shard(full, layout_of("decoder.layers.0.mlp.linear_fc1.weight"),
                                 rank, tp), expected)


def test_qkv_shards_are_whole_query_groups_and_row_parallel_splits_columns():
    # 2 query groups of [q0, q1, k, v] rows (head_dim 1): rank r holds group r.
    fused = torch.tensor([10.0, 11, 12, 13, 20, 21, 22, 23])
    qkv = layout_of("decoder.layers.3.self_attention.linear_qkv.bias")
    assert shard(fused, qkv, 1, 2).tolist() == [20, 21, 22, 23]
    proj = torch.arange(8.0).reshape(2, 4)
    assert shard(proj, layout_of("decoder.layers.0.self_attention.linear_proj.weight"),
                 1, 2).tolist() == [[2, 3], [6, 7]]
    assert layout_of("decoder.final_layernorm.weight") == Layout(None)


def test_layout_table_matches_megatron_parameter_attributes(single_process):
    cfg = load_config(None, ["model.num_layers=2", "parallel.tensor_parallel=1"])
    model = build_model(cfg.model, cfg.parallel, 64)
    for name, param in model.named_parameters():
        layout = layout_of(name)
        if getattr(param, "tensor_model_parallel", False):
            assert layout == Layout(param.partition_dim, param.partition_stride), name
        else:
            assert layout.dim is None, name


def test_split_then_merge_is_identity_and_pads_vocab(single_process):
    cfg = load_config(None, ["model.num_layers=1"])
    torch.manual_seed(0)
    full = build_model(cfg.model, cfg.parallel, 40).state_dict()
    shards = split_state_dict(full, tp=2, vocab_rows=48)
    assert shards[0]["embedding.weight"].shape == (24, cfg.model.hidden_size)
    assert torch.equal(shards[1]["output_layer.weight"][-8:],
                       torch.zeros(8, cfg.model.hidden_size))
    merged = merge_state_dicts(shards, vocab_rows=40)
    weights = {k: v for k, v in full.items() if resharding.is_weight(k, v)}
    assert sorted(merged) == sorted(weights)
    for key, value in weights.items():
        assert torch.equal(merged[key], value), key
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    assert torch.equal(unshard([s[fc1] for s in shards], layout_of(fc1)), full[fc1])


def test_bad_input_is_one_line_error():
    with pytest.raises(ReshardingError, match="no tensor-parallel layout known for 'foo.bar'"):
        layout_of("foo.bar")
    with pytest.raises(ReshardingError, match="does not split into 4 ranks"):
        shard(torch.zeros(6, 2), Layout(0), 0, 4)
