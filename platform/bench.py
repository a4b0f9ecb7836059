"""The benchmark runner behind ``omnidiff bench``: time training set-ups on the real training path.

Each :class:`~omnidiff.jobs.benchmarks.sweeps.BenchPoint` runs in fresh worker processes
(``omnidiff.parallel.launcher.spawn``; one per rank), so its peak memory is its own: peak RSS is
per process and never goes down. A worker builds the point's run config, the topology
(``topology.initialize``), the data stream the trainer uses (synthetic source, packed, noised),
then the engine (``build_engine`` with the diffusion objective, or the full-logits reference loss
when the masked head is off, or the released recipe's engine), runs warm-up and timed steps and
reports tokens, model FLOPs (``monitoring.flops``), step times and peak memory growth from just
before the engine is built (weights, gradients, optimizer state and activations included; on
CPU with glibc's mmap threshold fixed, :data:`WORKER_MALLOC_ENV`, so the resident set follows
the live tensors).

Derived here: tokens/s (total and per rank; also per CPU-second of all ranks, which other jobs
sharing the machine disturb less than wall time), model TFLOP/s, MFU against the device peak
(``monitoring.peaks``; on CPU the GEMM peak measured in this same run right before each point,
for the whole CPU the processes share) and each FP8 recipe's speed-up over the same point in
bf16. A point that cannot run here (FP8 without a GPU and Transformer Engine) is listed as
skipped, with why.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from omnidiff.data.config import DiffusionConfig
from omnidiff.data.streams.batches import batch_stream, noised_micro_batches
from omnidiff.data.streams.sources import build_sample_source
from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.data.tokens.text import build_vocab
from omnidiff.jobs.benchmarks.bench_released_recipe import ReleasedRecipeEngine
from omnidiff.jobs.benchmarks.sweeps import BenchPoint
from omnidiff.kernels.masked_head import IGNORE_INDEX, reference_lm_loss
from omnidiff.monitoring.flops import micro_batch_flops
from omnidiff.monitoring.peaks import PeakMemory, peak_flops
from omnidiff.parallel import topology
from omnidiff.parallel.engines import build_engine
from omnidiff.parallel.engines.base import TrainEngine
from omnidiff.parallel.gpu_stack import missing_gpu_stack
from omnidiff.parallel.launcher import spawn
from omnidiff.parallel.model import DTYPES
from omnidiff.platform.config import RunConfig, load_config
from omnidiff.platform.objective import DiffusionObjective, scored_positions


class FullLogitsObjective:
    """The masked head switched off: logits at every position through the plain reference
    (``kernels.masked_head.reference_lm_loss``), the loss kept at the scored positions. Same
    value and gradients as :class:`~omnidiff.platform.objective.DiffusionObjective`."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg

    def __call__(self, hidden: torch.Tensor, output_weight: torch.Tensor,
                 noised: NoisedBatch) -> torch.Tensor:
        rows, cols = scored_positions(noised, self.cfg.label_shift)
        seq, batch, width = hidden.shape
        labels = torch.full((seq, batch), IGNORE_INDEX, dtype=torch.long, device=hidden.device)
        weights = torch.zeros((seq, batch), dtype=torch.float32, device=hidden.device)
        labels[cols, rows] = noised.labels[noised.loss_mask]
        weights[cols, rows] = noised.loss_weights[noised.loss_mask]
        return reference_lm_loss(hidden.reshape(seq * batch, width), output_weight,
                                 labels.reshape(-1), weights.reshape(-1))


def build_point_engine(point: BenchPoint, cfg: RunConfig, dims, rows: int, vocab) -> TrainEngine:
    """The engine a point trains with (topology initialised)."""
    if point.engine == "released":
        from omnidiff.platform.hf_convert import hf_config_from
        from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion

        topology.seed(cfg.seed)
        config = hf_config_from(cfg.model, rows, mask_token_id=vocab.mask_id,
                                pad_token_id=vocab.eos_id, label_shift=cfg.diffusion.label_shift)
        model = OmniDiffusionForMaskedDiffusion(config).to(DTYPES[cfg.parallel.precision])
        return ReleasedRecipeEngine(model, cfg, dims, cfg.diffusion.label_shift)
    objective = DiffusionObjective if point.masked_head else FullLogitsObjective
    return build_engine(cfg, dims, rows, objective(cfg.diffusion))


def point_worker(values: dict, result_path: str, warmup: int, steps: int) -> None:
    """One rank of one point (spawned): train warm-up + timed steps, rank 0 writes the JSON."""
    point = BenchPoint.from_dict(values)
    cfg = load_config(None, point.config_overrides())
    dims = topology.initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    try:
        vocab, tokenizer = build_vocab(cfg.data)
        rows = vocab.padded_size(cfg.parallel.tensor_parallel)
        source = build_sample_source(cfg.data, cfg.seed, vocab, tokenizer, dims.dp_rank, dims.dp)
        stream = batch_stream(source, cfg.data, cfg.diffusion, vocab, cfg.seed, dims.dp_rank)
        batches = [noised_micro_batches(stream, cfg.diffusion, vocab, cfg.seed, step,
                                        dims.micro_batches(cfg.data), dims.dp_rank)
                   for step in range(warmup + steps)]
        memory = PeakMemory()
        memory.start()
        engine = build_point_engine(point, cfg, dims, rows, vocab)
        times, cpu_times, losses = [], [], []
        for step, micro_batches in enumerate(batches):
            start, cpu_start = time.perf_counter(), time.process_time()
            result = engine.train_step(micro_batches)
            if step >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
                losses.append(result.loss)
        counts = [micro_batch_flops(cfg.model, rows, b) for b in batches[warmup:]]
        record = {"rank": dims.rank, "tp_rank": dims.tp_rank, "pp_rank": dims.pp_rank,
                  "tokens_per_step": statistics.mean(c[0] for c in counts),
                  "flops_per_step": statistics.mean(c[1] for c in counts),
                  "step_times": times, "cpu_times": cpu_times, "losses": losses,
                  "peak_memory_bytes": memory.growth(),
                  "memory_method": memory.method, "threads": torch.get_num_threads()}
        gathered: list = [None] * dims.world_size
        dist.all_gather_object(gathered, record)
        if dims.is_main:
            Path(result_path).write_text(json.dumps(gathered))
    finally:
        topology.destroy()


def skip_reason(point: BenchPoint) -> str | None:
    """Why ``point`` cannot run on this machine, or None."""
    if point.fp8_recipe or point.transformer_engine:
        missing = missing_gpu_stack(point.fp8_recipe)
        if missing:
            return "needs " + " and ".join(missing)
    return None


def summarise(point: BenchPoint, ranks: list[dict], peak: float, devices: int) -> dict:
    """Throughput, MFU and memory of one run from its ranks' records."""
    owners = [r for r in ranks if r["tp_rank"] == 0 and r["pp_rank"] == 0]  # one per DP rank
    tokens = sum(r["tokens_per_step"] for r in owners)
    flops = sum(r["flops_per_step"] for r in owners)
    step = statistics.median(max(times) for times in zip(*(r["step_times"] for r in ranks)))
    cpu = statistics.median(sum(times) for times in zip(*(r["cpu_times"] for r in ranks)))
    return {"point": point.as_dict(), "label": point.label, "status": "ok",
            "step_seconds": step, "tokens_per_step": tokens, "cpu_seconds_per_step": cpu,
            "tokens_per_cpu_s": tokens / cpu,
            "tokens_per_s": tokens / step, "tokens_per_s_per_rank": tokens / step / len(ranks),
            "model_tflops": flops / step / 1e12, "mfu": flops / step / (peak * devices),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
            "memory_method": ranks[0]["memory_method"], "loss": ranks[0]["losses"][-1],
            "threads_per_rank": ranks[0]["threads"], "ranks": len(ranks)}


# glibc's mmap threshold held at its 128 KiB default (it otherwise climbs to 32 MiB): tensors
# freed by a step leave the resident set, so peak RSS follows live tensors, as the CUDA
# allocator's peak-allocated figure does, instead of glibc's free lists.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_point(point: BenchPoint, peak: float, warmup: int, steps: int) -> dict:
    """Run ``point`` in fresh processes (all cores shared among its ranks) and summarise it."""
    reason = skip_reason(point)
    if reason:
        return {"point": point.as_dict(), "label": point.label, "status": "skipped",
                "reason": reason}
    cuda = torch.cuda.is_available()
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // point.nprocs)),
           **WORKER_MALLOC_ENV}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # spawned workers start from this environment
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "result.json"
            spawn(point_worker, point.nprocs, point.as_dict(), str(path), warmup, steps)
            ranks = json.loads(path.read_text())
    except Exception as err:  # one failed point must not lose the sweep
        message = str(err).strip().splitlines()
        return {"point": point.as_dict(), "label": point.label, "status": "failed",
                "reason": message[-1] if message else type(err).__name__}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return summarise(point, ranks, peak, point.nprocs if cuda else 1)


def run_sweep(points: list[BenchPoint], warmup: int = 1, steps: int = 3, repeats: int = 1,
              progress=print) -> dict:
    """Every point ``repeats`` times, interleaved (point order within each repeat), then the
    per-point medians and FP8 speed-ups. Returns the JSON-able result.

    The device peak is taken right before each run (on CPU measured then, so a machine shared
    with other jobs is measured under the load the run meets)."""
    runs = []
    for repeat in range(repeats):
        for point in points:
            peak, how = (float("nan"), "") if skip_reason(point) else \
                peak_flops(point.precision)
            result = run_point(point, peak, warmup, steps)
            result.update(repeat=repeat, peak_flops=peak, peak_how=how)
            progress(_progress_line(result))
            runs.append(result)
    return {"runs": runs, "table": median_rows(points, runs)}


def _progress_line(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['label']}: {result['status']} ({result['reason']})"
    return (f"{result['label']}: {result['tokens_per_s']:.1f} tokens/s, "
            f"{result['model_tflops'] * 1e3:.1f} GFLOP/s, MFU {result['mfu']:.1%}, "
            f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB")


def median_rows(points: list[BenchPoint], runs: list[dict]) -> list[dict]:
    """One row per point: the median over its successful repeats (or its skip / failure),
    plus ``fp8_speedup``: tokens/s over the same point in bf16."""
    rows = {}
    for point in points:
        mine = [r for r in runs if r["label"] == point.label]
        good = [r for r in mine if r["status"] == "ok"]
        if not good:
            rows[point.label] = dict(mine[-1])
            continue
        row = dict(good[0])
        for key in ("step_seconds", "tokens_per_s", "tokens_per_s_per_rank", "model_tflops",
                    "mfu", "peak_memory_bytes", "peak_flops", "tokens_per_cpu_s"):
            row[key] = statistics.median(r[key] for r in good)
        row["repeats"] = len(good)
        rows[point.label] = row
    for point in points:
        bf16 = rows.get(replace(point, precision="bf16").label)
        row = rows[point.label]
        if point.fp8_recipe and row["status"] == "ok" and bf16 and bf16["status"] == "ok":
            row["fp8_speedup"] = row["tokens_per_s"] / bf16["tokens_per_s"]
    return list(rows.values())


# --- reports ----------------------------------------------------------------------------------
_COLUMNS = ("point", "status", "tokens/s", "tokens/s/rank", "model TFLOP/s", "device peak "
            "TFLOP/s", "MFU", "peak mem (GiB)", "FP8 speed-up")


def markdown_table(result: dict) -> str:
    """The per-point medians as a Markdown table, the peaks used below it."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in result["table"]:
        if row["status"] != "ok":
            cells = [row["label"], f"{row['status']}: {row['reason']}"] + [""] * 7
        else:
            speedup = row.get("fp8_speedup")
            cells = [row["label"], "ok", f"{row['tokens_per_s']:.1f}",
                     f"{row['tokens_per_s_per_rank']:.1f}", f"{row['model_tflops']:.4f}",
                     f"{row['peak_flops'] / 1e12:.4f}", f"{row['mfu']:.1%}",
                     f"{row['peak_memory_bytes'] / 2**30:.2f}",
                     f"{speedup:.2f}x" if speedup else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    hows = {r["peak_how"].split(" (")[0] for r in result["runs"] if r.get("peak_how")}
    lines += [f"- device peak: {how}, taken right before each run (median over repeats)"
              for how in sorted(hows)]
    methods = {r["memory_method"] for r in result["table"] if r["status"] == "ok"}
    glibc = f" (workers started with {WORKER_MALLOC_ENV})"
    lines += [f"- peak memory: {m}, max over ranks, from just before the engine is built"
              + (glibc if "RSS" in m else "") for m in sorted(methods)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> str | None:
    """tokens/s and MFU per point as a PNG; the reason when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    rows = [r for r in result["table"] if r["status"] == "ok"]
    if not rows:
        return "no successful point: no plot"
    labels = [r["label"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(rows) + 2), 8), sharex=True)
    top.bar(labels, [r["tokens_per_s"] for r in rows])
    top.set_ylabel("tokens/s (total)")
    bottom.bar(labels, [100 * r["mfu"] for r in rows], color="tab:orange")
    bottom.set_ylabel("MFU (%)")
    bottom.tick_params(axis="x", labelrotation=75, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def log_mlflow(result: dict, out_dir: Path, sweep: str, files: list[Path]) -> str | None:
    """One MLflow run per sweep (local sqlite store in ``out_dir``), a child run per point;
    the reason when it could not log (the sweep's own files are written regardless). Through
    an explicit client: the process's global MLflow state (tracking URI) is left alone."""
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        from omnidiff.monitoring.tracking import start_run

        uri = f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
        parent = start_run(uri, "omnidiff-bench", sweep)
        if parent is None:
            return f"MLflow logging failed (no store at {uri})"
        client, now = MlflowClient(uri), int(time.time() * 1000)
        for row in result["table"]:
            child = start_run(uri, "omnidiff-bench", row["label"], parent)
            metrics = [] if row["status"] != "ok" else [
                Metric(k, float(row[k]), now, 0) for k in (
                    "tokens_per_s", "tokens_per_s_per_rank", "model_tflops", "mfu",
                    "peak_memory_bytes", "step_seconds", "peak_flops", "fp8_speedup") if k in row]
            client.log_batch(child, metrics=metrics,
                             params=[Param(k, str(v)) for k, v in row["point"].items()],
                             tags=[RunTag("status", row["status"])])
            client.set_terminated(child)
        for path in files:
            client.log_artifact(parent, str(path))
        client.set_terminated(parent)
    except Exception as err:  # tracking is a convenience: never lose the measured sweep
        return f"MLflow logging failed ({type(err).__name__}: {err})"
    return None


def write_reports(result: dict, out_dir: Path, sweep: str, mlflow: bool = True) -> list[str]:
    """results.json, results.md, results.png and the MLflow run; returns warnings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "results.json", out_dir / "results.md"]
    files[0].write_text(json.dumps({"sweep": sweep, **result}, indent=1))
    files[1].write_text(markdown_table(result))
    warnings = [plot(result, out_dir / "results.png")]
    if warnings[0] is None:
        files.append(out_dir / "results.png")
    if mlflow:
        warnings.append(log_mlflow(result, out_dir, sweep, files))
    return [w for w in warnings if w]
