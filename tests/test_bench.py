"""``omnidiff bench``: sweep definitions, the loss paths it compares, device peaks, a tiny sweep
end to end (slow: spawned workers), and the FP8 sweep as it is on a GPU machine (gpu)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from omnidiff import ConfigError
from omnidiff.data.streams.batches import batch_stream, noised_micro_batches
from omnidiff.data.streams.sources import build_sample_source
from omnidiff.data.tokens.text import build_vocab
from omnidiff.jobs.benchmarks.bench_released_recipe import FullLogitsLoss, side_by_side_summary
from omnidiff.jobs.benchmarks.sweeps import BenchPoint, sweep_points
from omnidiff.monitoring.peaks import PeakMemory, gpu_peak, peak_flops
from omnidiff.parallel import topology
from omnidiff.parallel.engines.base import ModelWithLoss
from omnidiff.parallel.model import build_model
from omnidiff.platform.bench import (
    FullLogitsObjective, log_mlflow, run_sweep, skip_reason, write_reports)
from omnidiff.platform.config import load_config
from omnidiff.platform.hf_convert import hf_config_from, megatron_to_hf
from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion
from omnidiff.platform.objective import DiffusionObjective

TINY = ("data.image_codebook_size=64", "data.speech_codebook_size=64")


def test_sweep_points_become_valid_run_configs():
    points = sweep_points("precision", preset="tiny", seq_length=128)
    assert len(points) == 12 and len({p.label for p in points}) == 12
    for point in points:
        if point.fp8_recipe:
            continue  # TE configs validate, but only build where TE runs
        cfg = load_config(None, point.config_overrides())
        assert (cfg.parallel.tensor_parallel, cfg.parallel.nproc_per_node) == \
            (point.layout[0], point.nprocs)
        assert cfg.parallel.zero_stage == (0 if point.nprocs == 1 else 1)
        assert build_vocab(cfg.data)[0].padded_size() == 176_264  # the full vocabulary
    released = sweep_points("released-recipe")[0]
    assert released.engine == "released" and released.resolved_zero_stage() == 2
    with pytest.raises(ConfigError, match="unknown point field"):
        sweep_points("precision", colour="red")
    with pytest.raises(ConfigError, match="released recipe"):
        BenchPoint(engine="released", layout=(2, 1, 1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only verdict")
def test_fp8_points_are_skipped_with_the_reason_on_cpu():
    fp8 = [p for p in sweep_points("fp8") if p.fp8_recipe]
    assert len(fp8) == 4
    assert all("CUDA GPU" in skip_reason(p) for p in fp8)
    assert skip_reason(BenchPoint(precision="bf16")) is None


def test_device_peaks():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_peak("NVIDIA H100 80GB HBM3", "fp8-blockwise") == 1979e12
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert gpu_peak("a GPU nobody listed", "bf16") is None
    if not torch.cuda.is_available():
        value, how = peak_flops("fp32", "cpu")
        assert value > 1e9 and "measured" in how


def _child_peak_growth(queue) -> None:
    memory = PeakMemory(cuda=False)
    memory.start()
    grown = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    queue.put((memory.growth(), int(grown.sum())))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (RSS) measure")
def test_peak_memory_of_a_spawned_worker_is_its_own_not_its_parents():
    """ru_maxrss carries the parent's peak across fork + exec: a worker spawned by a 1 GiB
    process would report ~1 GiB. The measure must see only the child's own 64 MiB."""
    import multiprocessing

    ballast = torch.ones(2**28)  # 1 GiB resident in this (parent) process
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_peak_growth, args=(queue,))
    child.start()
    growth, _ = queue.get(timeout=120)
    child.join()
    del ballast
    assert 60 * 2**20 < growth < 200 * 2**20, growth / 2**20


def _batch(cfg):
    vocab, tokenizer = build_vocab(cfg.data)
    source = build_sample_source(cfg.data, cfg.seed, vocab, tokenizer)
    stream = batch_stream(source, cfg.data, cfg.diffusion, vocab, cfg.seed)
    return vocab, noised_micro_batches(stream, cfg.diffusion, vocab, cfg.seed, 0, 1)[0]


def test_full_logits_loss_paths_agree_with_the_masked_head(single_process):
    """The bench's two alternatives to the masked head compute the same loss and gradients:
    the full-logits reference objective on the megatron model, and the released recipe's
    full-logits CE on the HF class holding the same weights."""
    cfg = load_config(None, ["model.preset=tiny", "data.seq_length=128",
                             "data.micro_batch_size=2", "data.global_batch_size=2", *TINY])
    vocab, batch = _batch(cfg)
    rows = vocab.padded_size()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.parallel, rows)
    grads = {}
    for name, objective in (("masked", DiffusionObjective), ("full", FullLogitsObjective)):
        model.zero_grad(set_to_none=True)
        loss = ModelWithLoss(model, objective(cfg.diffusion))(batch)
        loss.backward()
        grads[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["full"][0], grads["masked"][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads["full"][1], grads["masked"][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    hf = OmniDiffusionForMaskedDiffusion(hf_config_from(
        cfg.model, rows, mask_token_id=vocab.mask_id, pad_token_id=vocab.eos_id))
    hf.load_state_dict(megatron_to_hf(model.state_dict(), cfg.model))
    released = FullLogitsLoss(hf, cfg.diffusion.label_shift)(batch)
    torch.testing.assert_close(released.detach(), grads["masked"][0], rtol=1e-5, atol=1e-5)


def test_side_by_side_summary_takes_medians_and_ratios():
    def run(engine, tokens, memory):
        return {"status": "ok", "point": {"engine": engine}, "tokens_per_s": tokens,
                "tokens_per_cpu_s": tokens / 2, "peak_memory_bytes": memory}

    text = side_by_side_summary([run("released", 10, 4 * 2**30), run("platform", 19, 2 * 2**30),
                                 run("released", 12, 4 * 2**30), run("platform", 21, 2 * 2**30)])
    assert "tokens/s 1.82x (per CPU-second 1.82x), peak memory 0.50x" in text
    assert "no ratio" in side_by_side_summary([run("platform", 1, 1)])


@pytest.mark.slow
def test_a_tiny_sweep_end_to_end(tmp_path):
    """Spawned workers train each point on the real engines; reports are written."""
    base = dict(preset="tiny", seq_length=128, text_vocab_size=None, overrides=TINY)
    points = [BenchPoint(**base, layout=(2, 1, 1)),
              BenchPoint(**base, engine="released"),
              BenchPoint(**base, precision="fp8-delayed")]
    result = run_sweep(points, warmup=1, steps=1, progress=lambda line: None)
    rows = {row["point"]["engine"] + row["point"]["precision"]: row for row in result["table"]}
    expect_fp8 = "ok" if not skip_reason(points[2]) else "skipped"
    assert rows["platformfp8-delayed"]["status"] == expect_fp8
    for key in ("platformfp32", "releasedfp32"):
        row = rows[key]
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1.5
        assert row["peak_memory_bytes"] > 0 and row["tokens_per_step"] >= 128
        assert row["tokens_per_cpu_s"] > 0
    assert rows["platformfp32"]["ranks"] == 2
    warnings = write_reports(result, tmp_path, "tiny", mlflow=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["table"]) == 3 and "| point |" in (tmp_path / "results.md").read_text()
    assert all("matplotlib" in w for w in warnings)


def test_a_sweep_is_one_mlflow_run_with_a_child_per_point(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    figures = {"tokens_per_s": 10.0, "tokens_per_s_per_rank": 5.0, "model_tflops": 0.1,
               "mfu": 0.4, "peak_memory_bytes": 2.0**20, "step_seconds": 1.5, "peak_flops": 1e11}
    result = {"table": [{"label": "fp32 TP1", "point": {"precision": "fp32"}, "status": "ok",
                         **figures},
                        {"label": "fp8 TP1", "point": {"precision": "fp8-delayed"},
                         "status": "skipped", "reason": "needs a CUDA GPU"}]}
    (tmp_path / "results.md").write_text("| point |")
    assert log_mlflow(result, tmp_path, "precision", [tmp_path / "results.md"]) is None
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the process's MLflow state is untouched
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("omnidiff-bench").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "precision")
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"fp32 TP1", "fp8 TP1"}
    assert children["fp32 TP1"].data.metrics["tokens_per_s"] == 10.0
    assert children["fp8 TP1"].data.tags["status"] == "skipped"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["results.md"]


@pytest.mark.gpu
def test_fp8_sweep_on_a_gpu(tmp_path):
    """The FP8 sweep as it is: bf16 and every recipe this GPU supports run, with speed-ups."""
    points = sweep_points("fp8", seq_length=1024)
    result = run_sweep(points, warmup=2, steps=5, progress=print)
    rows = {row["point"]["precision"]: row for row in result["table"]}
    assert rows["bf16"]["status"] == "ok"
    for point in points[1:]:
        row = rows[point.precision]
        assert row["status"] == ("skipped" if skip_reason(point) else "ok"), row
        if row["status"] == "ok":
            assert row["fp8_speedup"] > 0
    write_reports(result, tmp_path, "fp8", mlflow=False)
