"""Packed THD attention (``cu_seqlens``) against the dense block-diagonal mask it replaced, and
the device discipline of a training step: nothing left on the host, no host sync in the step,
every collective on its group's device."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state

from omnidiff.data.config import DiffusionConfig
from omnidiff.data.tokens.noising import noise_batch, packed_cu_seqlens
from omnidiff.data.tokens.packing import TokenSample, collate_rows
from omnidiff.kernels.attention import PackedSDPAttention, packed_sequences, reference_attention
from omnidiff.parallel import collectives, topology
from omnidiff.parallel.dims import ParallelDims
from omnidiff.parallel.launcher import spawn
from omnidiff.parallel.model import OmniDiffusionTransformer, transformer_config
from omnidiff.parallel.specs import portable_spec
from omnidiff.platform.config import load_config

REPO = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 320, 48


def _packed_batch(rows: int = 2, seed: int = 0):
    """Rows of 1-3 samples of different lengths and a padding tail."""
    gen = torch.Generator().manual_seed(seed)
    samples = [[TokenSample(torch.randint(0, VOCAB - 1, (n,), generator=gen),
                            torch.arange(n) >= 3) for n in lengths]
               for lengths in ([13, 20, 9], [30], [7, 7])[:rows]]
    return collate_rows(samples, SEQ, VOCAB - 1)


def test_cu_seqlens_mark_every_sample_and_padding_run():
    batch = _packed_batch(rows=3)
    cu = packed_cu_seqlens(batch.segment_ids)
    assert cu.dtype == torch.int32
    # row 0: 13, 20, 9, pad 6 | row 1: 30, pad 18 | row 2: 7, 7, pad 34
    assert cu.diff().tolist() == [13, 20, 9, 6, 30, 18, 7, 7, 34]


def test_core_attention_thd_equals_the_dense_mask():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.num_layers=1"])
    attention = PackedSDPAttention(transformer_config(cfg.model, cfg.parallel), 1, None, "self")
    batch = _packed_batch()
    b, s, heads, groups, d = 2, SEQ, 4, 2, 16
    q, k, v = (torch.randn(b * s, n, d) for n in (heads, groups, groups))
    cu = packed_cu_seqlens(batch.segment_ids)
    packed = attention(q, k, v, None, packed_seq_params=packed_sequences(
        cu, s, tuple(cu.diff().tolist())))
    from omnidiff.kernels.attention import block_diagonal_mask
    dense = reference_attention(*(t.reshape(b, s, -1, d).transpose(1, 2) for t in (q, k, v)),
                                block_diagonal_mask(batch.segment_ids))
    assert torch.allclose(packed.reshape(b, s, heads, d), dense.transpose(1, 2), atol=1e-6)


def _model_outputs(attention: str, tp: int, sequence_parallel: bool) -> tuple:
    cfg = load_config(None, ["model.num_layers=2", f"parallel.tensor_parallel={tp}",
                             f"parallel.sequence_parallel={str(sequence_parallel).lower()}"])
    topology.seed(3)
    model = OmniDiffusionTransformer(transformer_config(cfg.model, cfg.parallel), VOCAB,
                                     cfg.model.rope_theta, portable_spec(), attention=attention)
    batch = noise_batch(_packed_batch(), DiffusionConfig(), VOCAB - 1,
                        torch.Generator().manual_seed(1))
    hidden = model(batch.input_ids, batch.position_ids, batch.segment_ids, batch.cu_seqlens)
    real = batch.segment_ids.t() > 0  # [s, b]: padding outputs are never used
    loss = hidden[real].square().mean()
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.clone()
        if getattr(param, "sequence_parallel", False):  # each rank's share: sum, as engines do
            torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        grads[name] = grad
    return hidden[real].detach(), grads


def _tp_worker(out: str, sequence_parallel: bool) -> None:
    dims = topology.initialize(tp=2)
    try:
        result = {a: _model_outputs(a, 2, sequence_parallel) for a in ("thd", "dense")}
        if dims.rank == 0:
            torch.save(result, out)
    finally:
        topology.destroy()


def _assert_close(thd, dense) -> None:
    assert torch.allclose(thd[0], dense[0], atol=1e-5, rtol=1e-5)
    for name, grad in dense[1].items():
        assert torch.allclose(thd[1][name], grad, atol=1e-5, rtol=1e-4), name


def test_model_thd_equals_dense_at_tp1(single_process):
    _assert_close(_model_outputs("thd", 1, False), _model_outputs("dense", 1, False))


@pytest.mark.slow
def test_model_thd_equals_dense_at_tp2_with_sequence_parallelism(tmp_path):
    out = str(tmp_path / "tp2.pt")
    spawn(_tp_worker, 2, out, True)
    result = torch.load(out, weights_only=True)
    _assert_close(result["thd"], result["dense"])


# --- device discipline -----------------------------------------------------------------------
def test_a_training_step_runs_on_another_device_than_the_batches_are_made(single_process,
                                                                          monkeypatch):
    """Model, optimizer and batches on ``meta``, batches made on the host: any tensor left on
    the host, or any read of a device value in the step (``.item()``, ``int()``, ``nonzero``)
    fails, except the engine's one read per step, replaced here."""
    from omnidiff.parallel.engines import base, build_engine, local
    from omnidiff.platform.objective import DiffusionObjective

    meta = ParallelDims(1, device=torch.device("meta"), groups=single_process.groups)
    monkeypatch.setattr(local, "host_values", lambda *values: tuple(1.0 for _ in values))
    cfg = load_config(None, ["model.num_layers=2", "data.seq_length=48",
                             "data.global_batch_size=2", "data.micro_batch_size=1"])
    engine = build_engine(cfg, meta, VOCAB, DiffusionObjective(cfg.diffusion))
    assert all(p.device.type == "meta" for p in engine.model.parameters())
    host = [noise_batch(_packed_batch(rows=1, seed=s), cfg.diffusion, VOCAB - 1,
                        torch.Generator().manual_seed(s)) for s in (1, 2)]
    result = engine.train_step([b.to("meta") for b in host])
    assert result.num_masked == sum(b.num_masked for b in host) and not result.skipped
    with pytest.raises((RuntimeError, NotImplementedError)):
        engine.train_step(host)  # batches left on the host are caught
    assert base.host_values is not local.host_values  # only the engine's read was replaced


def test_collectives_check_the_device_of_their_group():
    with pytest.raises(collectives.CollectiveDeviceError, match="DP loss mean: tensor on cpu"):
        collectives.all_reduce(torch.zeros(1), None, torch.device("meta"), what="DP loss mean")
    collectives.all_reduce(torch.zeros(1, device="meta"), None, torch.device("meta"))
    collectives.all_reduce(torch.zeros(1), None, torch.device("cpu"))


RAW_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
                   "reduce_scatter", "reduce_scatter_tensor", "reduce", "all_to_all"}


def test_no_raw_tensor_collective_outside_the_checked_module():
    """The package's own tensor collectives all go through ``parallel/collectives.py``."""
    offenders = []
    for folder in ("data", "parallel", "monitoring", "jobs", "k8s", "platform"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "collectives.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in RAW_COLLECTIVES
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id in ("dist", "distributed")):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
