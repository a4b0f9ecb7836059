"""The trainer and the engines on CUDA (``gpu``-marked: they skip without a GPU), and the GPU
smoke script's clean stop on a machine without one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnidiff.monitoring.sinks import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = ("jobs/configs/tiny.yaml", "schedule.train_steps=3", "logging.log_interval=1",
        "logging.progress_bar=false")


def _train(tmp_path, *overrides) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "omnidiff.platform.cli", "train", *TINY,
                           f"output_dir={tmp_path}", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only stop")
def test_gpu_smoke_script_stops_cleanly_without_a_gpu():
    done = subprocess.run(["bash", "jobs/gpu_smoke.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA GPU is visible" in done.stdout and "stopping here" in done.stdout
    assert "megatron.core" in done.stdout and "deepspeed" in done.stdout


@pytest.mark.gpu
def test_trainer_runs_on_cuda_with_the_model_and_batches_there(tmp_path):
    from omnidiff.parallel import topology
    from omnidiff.platform.config import load_config
    from omnidiff.platform.trainer import Trainer

    cfg = load_config(REPO / TINY[0], [*TINY[1:], f"output_dir={tmp_path}",
                                       "parallel.precision=bf16"])
    trainer = Trainer(cfg)
    try:
        assert trainer.dims.device.type == "cuda"
        assert all(p.is_cuda for p in trainer.engine.model.parameters())
        batches = trainer._on_device(trainer._micro_batches(0))
        assert all(b.input_ids.is_cuda and not b.cu_seqlens.is_cuda for b in batches)
        summary = trainer.run()
        assert len(summary.losses) == 3 and all(map(torch.isfinite, map(torch.tensor,
                                                                          summary.losses)))
    finally:
        topology.destroy()


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [
    ("parallel.transformer_engine=true", "parallel.precision=bf16", "parallel.zero_stage=1"),
    ("parallel.transformer_engine=true", "parallel.precision=bf16", "model.hidden_size=256",
     "model.ffn_hidden_size=512", "parallel.fp8=hybrid", "parallel.fp8_recipe=delayed"),
], ids=["te-bf16-zero1", "te-fp8-delayed"])
def test_engines_train_on_cuda(tmp_path, overrides):
    rows = _train(tmp_path, *overrides)
    assert len(rows) == 3 and all(row["loss"] is not None for row in rows)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("layout", [("parallel.tensor_parallel=2", "parallel.sequence_parallel=true"),
                                    ("parallel.pipeline_parallel=2",)], ids=["tp2-sp", "pp2"])
def test_nccl_layouts_train(tmp_path, layout):
    rows = _train(tmp_path, "parallel.nproc_per_node=2", "parallel.precision=bf16",
                  "parallel.zero_stage=1", "parallel.transformer_engine=true", *layout)
    assert len(rows) == 3
