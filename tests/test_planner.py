"""``omnidiff plan``: parameter counts, the ranked plan and its job file, and the memory model
against peaks measured on this CPU with the real engines (slow: spawned workers)."""

from __future__ import annotations

import pytest
import torch

from omnidiff.data.config import DataConfig
from omnidiff.data.tokens.text import build_vocab
from omnidiff.jobs.benchmarks.sweeps import BenchPoint
from omnidiff.jobs.curriculum import load_job
from omnidiff.jobs.plan_model import (
    Layout, Workload, memory_per_rank, stage_parameters, total_parameters)
from omnidiff.jobs.planner import Cluster, cpu_device, plan, table, write_job
from omnidiff.parallel.config import ModelConfig, ParallelConfig
from omnidiff.parallel.model import build_model, count_parameters
from omnidiff.platform.bench import run_point
from omnidiff.platform.cli import main
from omnidiff.platform.config import build_config

DREAM = ModelConfig(preset="dream-7b")


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parameter_counts_match_the_built_model(single_process, preset):
    model_cfg = ModelConfig(preset=preset)
    with torch.device("meta"):
        model = build_model(model_cfg, ParallelConfig(), 1024, perform_initialization=False)
    assert total_parameters(model_cfg, 1024) == count_parameters(model)
    stages = stage_parameters(model_cfg, 1024, tp=1, pp=2)
    assert sum(stages) == count_parameters(model)


def test_dream_7b_has_the_published_size():
    assert abs(total_parameters(DREAM, 176_264) / 1e9 - 7.79) < 0.01


def test_dream_7b_plan_on_four_h100_nodes_writes_a_loadable_job(tmp_path):
    cluster = Cluster(nodes=4, gpus_per_node=8, gpu="h100")
    plans = plan(Workload(DREAM, 176_264, 3072, 128), cluster)
    fitting = [p for p in plans if p.fits]
    assert fitting and not plans[-1].fits  # some layouts do not fit 80 GB, the best do
    best = fitting[0]
    assert best.layout.world == 32 and best.memory["total"] < 0.9 * 80 * 2**30
    assert all(a.tokens_per_s_per_gpu >= b.tokens_per_s_per_gpu
               for a, b in zip(fitting, fitting[1:]))
    assert best.layout.label in table(plans, top=3)
    path = write_job(best, cluster, "dream-7b", 3072, 128, tmp_path / "job.yaml")
    job = load_job(path)
    assert job.cluster["nodes"] == 4 and job.cluster["gpus_per_node"] == 8
    cfg = build_config(job.stage_run_config(0))
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
            cfg.parallel.zero_stage, cfg.parallel.recompute) == (
        best.layout.tp, best.layout.pp, best.layout.zero_stage, best.layout.recompute)
    assert cfg.data.micro_batch_size == best.layout.micro_batch


def test_plan_command_reports_a_cluster_too_small(tmp_path, capsys):
    code = main(["plan", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "a100",
                 "--out", str(tmp_path / "job.yaml")])
    assert code == 2 and "no layout of dream-7b fits" in capsys.readouterr().err


# Three layouts on a 4-layer small model (2 x 512-token rows per micro-batch, 512-entry media
# codebooks): no recompute (the peak is the start of backward: activations), full recompute
# (the peak is the optimizer update), and TP=2 with sequence parallelism on DeepSpeed ZeRO-1.
_SHAPE = ("model.num_layers=4", "data.image_codebook_size=512", "data.speech_codebook_size=512")
VALIDATION = {
    "one process, no recompute": (BenchPoint(recompute="none"), Layout(1, 1, 1, 0)),
    "one process, full recompute": (BenchPoint(recompute="full"), Layout(1, 1, 1, 0, "full")),
    "TP=2 + SP, ZeRO-1": (BenchPoint(layout=(2, 1, 1)), Layout(2, 1, 1, 1)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VALIDATION))
def test_memory_model_within_15_percent_of_the_measured_cpu_peak(name):
    point, layout = VALIDATION[name]
    sp = ("parallel.sequence_parallel=true",) if layout.tp > 1 else ()
    point = BenchPoint(preset="small", seq_length=512, micro_batch=2, text_vocab_size=None,
                       recompute=point.recompute, layout=point.layout, overrides=_SHAPE + sp)
    layout = Layout(layout.tp, 1, 1, layout.zero_stage, layout.recompute, None, micro_batch=2)
    measured = run_point(point, peak=1.0, warmup=1, steps=1)
    assert measured["status"] == "ok", measured
    rows = build_vocab(DataConfig(image_codebook_size=512, speech_codebook_size=512))[0] \
        .padded_size(layout.tp)
    work = Workload(ModelConfig(preset="small", num_layers=4), rows, 512, 2, precision="fp32")
    estimate = memory_per_rank(work, layout, cpu_device(layout))["total"]
    error = estimate / measured["peak_memory_bytes"] - 1
    print(f"{name}: estimate {estimate / 2**30:.3f} GiB, measured "
          f"{measured['peak_memory_bytes'] / 2**30:.3f} GiB, error {error:+.1%}")
    assert abs(error) < 0.15
