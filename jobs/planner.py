"""``omnidiff plan``: pick a parallel layout for a model, sequence, global batch and cluster.

Every layout the platform can run is enumerated (TP within a node dividing the heads and KV
groups, PP dividing the layers, DP the rest; ZeRO 1-3 as :func:`omnidiff.parallel.dims.
check_layout` allows; recomputation none / selective / full; bf16 or the GPU's FP8 recipe;
micro-batch 1, 2, 4), costed by :mod:`omnidiff.jobs.plan_model` (memory per GPU, step time),
the ones that fit ranked by tokens/s per GPU, and the best written as a job file in the format of
``jobs/curricula/omni-diffusion.yaml`` (its ``run.parallel`` and ``cluster`` filled in).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from omnidiff import ConfigError
from omnidiff.jobs.curriculum import load_job, read_job, resolve_job_path
from omnidiff.jobs.plan_model import (
    Device, Layout, Workload, memory_per_rank, model_flops, step_time)
from omnidiff.monitoring.peaks import gpu_peak
from omnidiff.parallel.config import ModelConfig

GIB = 2.0**30
USABLE_MEMORY = 0.9  # of the GPU's memory: allocator fragmentation, NCCL and library workspaces


@dataclass(frozen=True)
class GpuSpec:
    """What the planner needs of a GPU type (vendor data; bandwidths achievable, per GPU)."""

    device_name: str  # as torch.cuda.get_device_name() reports it (peak FLOP/s lookup)
    memory_gib: float
    hbm_gbps: float  # GB/s
    nvlink_gbps: float  # achievable collective bus bandwidth inside a node, GB/s
    fp8_recipe: str | None  # the FP8 recipe planned for this GPU (None: no FP8)


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 80, 3350, 360, "tensorwise"),
    "h100-pcie": GpuSpec("NVIDIA H100 PCIe", 80, 2000, 50, "tensorwise"),
    "h200": GpuSpec("NVIDIA H200", 141, 4800, 360, "tensorwise"),
    "b200": GpuSpec("NVIDIA B200", 180, 8000, 720, "mxfp8"),
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", 80, 2039, 240, None),
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: str = "h100"
    nvlink_gbps: float | None = None  # default: the GPU type's
    ib_gbps: float = 45.0  # per GPU: 400 Gb/s NDR at ~90 %
    bf16_efficiency: float = 0.55  # achievable fraction of the bf16 dense peak
    fp8_efficiency: float = 0.38  # achievable fraction of the FP8 dense peak

    def __post_init__(self) -> None:
        if self.gpu not in GPUS:
            raise ConfigError(f"cluster gpu {self.gpu!r}: one of {', '.join(GPUS)}")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError("cluster nodes and gpus_per_node must be >= 1")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def device(self, fp8: str | None) -> Device:
        spec = GPUS[self.gpu]
        precision = "fp8" if fp8 else "bf16"
        efficiency = self.fp8_efficiency if fp8 else self.bf16_efficiency
        return Device(spec.device_name, spec.memory_gib * GIB, gpu_peak(spec.device_name,
                      precision), efficiency, spec.hbm_gbps * 1e9,
                      (self.nvlink_gbps or spec.nvlink_gbps) * 1e9, self.ib_gbps * 1e9,
                      self.gpus_per_node)


def cpu_device(layout: Layout) -> Device:
    """A CPU process as the planner's device, for checking the memory model against measured
    peaks: SDPA's float mask, torch's single-tensor AdamW, the local engine for one process at
    ZeRO 0, else DeepSpeed with its 128 MiB shared-memory all-reduce buffer. Speeds unused."""
    deepspeed = layout.world > 1 or layout.zero_stage > 0
    return Device("cpu", float("inf"), 1.0, 1.0, 1.0, 1.0, 1.0, 1, attention="sdpa-cpu",
                  fused_optimizer=False, deepspeed_engine=deepspeed,
                  runtime_bytes=2**27 if deepspeed else 0.0)


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: dict[str, float]
    time: dict[str, float]
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    mfu: float  # against the bf16 dense peak, as the throughput anchors report it
    fits: bool


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(model: ModelConfig, work: Workload, cluster: Cluster,
            fp8: str | None = "auto") -> list[Layout]:
    """Every layout the platform can run on ``cluster`` for ``work``."""
    recipes = [None]
    planned = GPUS[cluster.gpu].fp8_recipe
    if fp8 == "auto" and planned:
        recipes.append(planned)
    elif fp8 not in (None, "auto", "none"):
        recipes = [fp8]
    out = []
    for tp in _divisors(cluster.gpus_per_node):
        if model.num_attention_heads % tp or model.num_query_groups % tp \
                or work.seq_length % tp:
            continue
        for pp in _divisors(model.num_layers):
            if cluster.world % (tp * pp):
                continue
            dp = cluster.world // (tp * pp)
            zeros = [1] if pp > 1 else ([0, 1, 2, 3] if tp * pp * dp == 1 else [1, 2, 3])
            for micro in (1, 2, 4):
                if work.global_batch % (micro * dp):
                    continue
                for zero in zeros:
                    for recompute in ("none", "selective", "full"):
                        for recipe in recipes:
                            out.append(Layout(tp, pp, dp, zero, recompute, recipe, micro))
    return out


def evaluate(work: Workload, layout: Layout, cluster: Cluster) -> Plan:
    device = cluster.device(layout.fp8)
    memory = memory_per_rank(work, layout, device)
    time = step_time(work, layout, device)
    seconds = time["total"]
    tokens = work.global_batch * work.seq_length / seconds / layout.world
    flops = model_flops(work) / seconds / layout.world
    bf16_peak = gpu_peak(GPUS[cluster.gpu].device_name, "bf16")
    return Plan(layout, memory, time, tokens, flops / 1e12, flops / bf16_peak,
                memory["total"] <= USABLE_MEMORY * device.memory_bytes)


def plan(work: Workload, cluster: Cluster, fp8: str | None = "auto") -> list[Plan]:
    """All layouts, feasible first, each group by tokens/s per GPU (best first)."""
    plans = [evaluate(work, layout, cluster) for layout in layouts(work.model, work, cluster, fp8)]
    return sorted(plans, key=lambda p: (not p.fits, -p.tokens_per_s_per_gpu,
                                        p.memory["total"]))


def table(plans: list[Plan], top: int = 10) -> str:
    """The best ``top`` feasible plans as a Markdown table."""
    header = ("| # | layout | memory/GPU (GiB) | step (s) | tokens/s/GPU | model TFLOP/s/GPU | "
              "MFU (bf16 peak) | compute / TP / PP / DP comm (s) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for index, item in enumerate([p for p in plans if p.fits][:top], start=1):
        t = item.time
        lines.append(
            f"| {index} | {item.layout.label} | {item.memory['total'] / GIB:.1f} | "
            f"{t['total']:.2f} | {item.tokens_per_s_per_gpu:,.0f} | "
            f"{item.model_tflops_per_gpu:.0f} | {item.mfu:.1%} | {t['compute']:.2f} / "
            f"{t['tp_comm']:.2f} / {t['pp_bubble'] + t['pp_p2p']:.2f} / {t['dp_comm']:.2f} |")
    return "\n".join(lines)


def write_job(best: Plan, cluster: Cluster, work_preset: str, seq_length: int,
              global_batch: int, out: str | Path, base: str = "omni-diffusion") -> Path:
    """The base job file with this plan's ``run.parallel``, batch keys and ``cluster``."""
    raw = read_job(resolve_job_path(base))  # merged: the plan stands alone
    layout = best.layout
    run = raw.setdefault("run", {})
    parallel = dict(run.get("parallel", {}))
    parallel.update(tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                    sequence_parallel=layout.sequence_parallel, zero_stage=layout.zero_stage,
                    nproc_per_node=cluster.gpus_per_node, precision="bf16",
                    transformer_engine=True, recompute=layout.recompute)
    for key in ("fp8", "fp8_recipe"):
        parallel.pop(key, None)
    if layout.fp8:
        parallel.update(fp8="e4m3" if layout.fp8 in ("blockwise", "mxfp8") else "hybrid",
                        fp8_recipe=layout.fp8)
    run["parallel"] = parallel
    run.setdefault("model", {})["preset"] = work_preset
    run.setdefault("data", {}).update(seq_length=seq_length, micro_batch_size=layout.micro_batch,
                                      global_batch_size=global_batch)
    raw["cluster"] = {**raw.get("cluster", {}), "nodes": cluster.nodes,
                      "gpus_per_node": cluster.gpus_per_node}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = (f"# Written by `omnidiff plan`: {layout.label} on {cluster.nodes} x "
            f"{cluster.gpus_per_node} {cluster.gpu}; predicted "
            f"{best.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {best.mfu:.1%}, "
            f"{best.memory['total'] / GIB:.1f} GiB/GPU.\n")
    out.write_text(note + yaml.safe_dump(raw, sort_keys=False))
    load_job(out)  # the written file must load as a job
    return out
