"""From a job definition to what each stage runs on the cluster, checked before any manifest.

A :class:`StagePlan` is one stage's resource name and its run config as the pod reads it: the
job's keys, the stage's keys, then what the cluster decides (processes per node, resume on
restart, the MLflow URI) and the hand-over from the previous stage. Stage ``n + 1`` starts from
stage ``n``'s Hugging Face export on the shared volume (``checkpoint.init_from`` =
``<output_dir>/<stage n>/export``, the curriculum runner's contract); stage 1 from the job's
``init.hf`` folder, if any.

Every layout problem is refused here, as one line, with the layout checks of
:mod:`omnidiff.parallel.dims` (never a second copy of them) plus the one that only a cluster
has: a tensor-parallel group must not span nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from omnidiff import ConfigError
from omnidiff.data.config import DataConfig
from omnidiff.jobs.curriculum import JobConfig
from omnidiff.k8s.config import ClusterConfig, validate_section
from omnidiff.parallel.config import ModelConfig, ParallelConfig
from omnidiff.parallel.dims import ParallelDims, check_layout, micro_batches_per_rank

EXPORT_DIR = "export"  # <stage output_dir>/export: the stage's HF folder (runner contract)
STAGE_MARKER = "stage.json"  # written by a stage that finished (runner contract)
# RFC 1035, short enough for JobSet pod host names (<name>-node-<job>-<pod>, at most 63).
_RESOURCE_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RESOURCE_NAME = 45


@dataclass(frozen=True)
class StagePlan:
    """One curriculum stage as a cluster workload."""

    index: int  # 0-based
    stage: str  # the stage's name in the job
    name: str  # the workload's resource name: <job>-<stage>
    output_dir: str
    run_config: dict[str, Any]

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"

    @property
    def export_dir(self) -> str:
        return str(PurePosixPath(self.output_dir) / EXPORT_DIR)


def plan_job(job: JobConfig, cluster: ClusterConfig) -> list[StagePlan]:
    """Every stage's plan, in order; raises :class:`ConfigError` (one line) on a bad job."""
    plans: list[StagePlan] = []
    for index, stage in enumerate(job.stages):
        name = f"{job.name}-{stage.name}"
        if not _RESOURCE_NAME.match(name) or len(name) > MAX_RESOURCE_NAME:
            raise ConfigError(f"job {job.name}: resource name {name!r} (name-stage) must start "
                              f"with a letter and be at most {MAX_RESOURCE_NAME} characters")
        raw = job.stage_run_config(index)
        _check_output_dir(job, stage.name, raw["output_dir"], cluster)
        _check_layout(f"job {job.name}, stage {stage.name}", raw, cluster)
        init_from = plans[-1].export_dir if plans else (job.init.hf if job.init else None)
        export_dir = str(PurePosixPath(raw["output_dir"]) / EXPORT_DIR) if job.export else None
        plans.append(StagePlan(index, stage.name, name, raw["output_dir"],
                               _cluster_run_config(raw, cluster, init_from, export_dir)))
    return plans


def select(plans: list[StagePlan], stage: str) -> list[StagePlan]:
    """``all``, a 1-based stage number or a stage name -> the plans it means."""
    if stage == "all":
        return plans
    for plan in plans:
        if stage in (str(plan.index + 1), plan.stage):
            return [plan]
    names = ", ".join(f"{p.index + 1} ({p.stage})" for p in plans)
    raise ConfigError(f"--stage {stage}: expected all or one of {names}")


def _cluster_run_config(raw: dict[str, Any], cluster: ClusterConfig, init_from: str | None,
                        export_dir: str | None) -> dict[str, Any]:
    """The stage's run config with what the cluster decides."""
    raw.setdefault("parallel", {})["nproc_per_node"] = cluster.procs_per_node
    checkpoint = raw.setdefault("checkpoint", {})
    checkpoint.setdefault("resume", "auto")  # a restarted node resumes, a fresh one starts
    if init_from:
        checkpoint["init_from"] = init_from
    if export_dir:  # rank 0 writes the HF folder the next stage starts from
        checkpoint["export_dir"] = export_dir
    uri = cluster.tracking_uri()
    if uri:
        raw.setdefault("logging", {}).setdefault("mlflow_tracking_uri", uri)
    return raw


def _check_output_dir(job: JobConfig, stage: str, output_dir: str,
                      cluster: ClusterConfig) -> None:
    mount = PurePosixPath(cluster.storage.mount_path)
    path = PurePosixPath(output_dir)
    if not path.is_absolute() or mount not in (path, *path.parents):
        raise ConfigError(f"job {job.name}, stage {stage}: output_dir {output_dir} must lie on "
                          f"the shared volume (cluster.storage.mount_path {mount})")


def _check_layout(where: str, raw: dict[str, Any], cluster: ClusterConfig) -> None:
    try:
        _layout(raw, cluster)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _layout(raw: dict[str, Any], cluster: ClusterConfig) -> None:
    """The run's layout on ``cluster.nodes`` x ``procs_per_node`` processes."""
    model = validate_section(ModelConfig, raw.get("model"), "model")
    parallel = validate_section(ParallelConfig, raw.get("parallel"), "parallel")
    data = validate_section(DataConfig, raw.get("data"), "data")
    check_layout(model, parallel, data)
    tp, per_node = parallel.tensor_parallel, cluster.procs_per_node
    if per_node % tp:
        raise ConfigError(f"parallel.tensor_parallel ({tp}) must divide the processes per node "
                          f"(cluster.gpus_per_node {per_node}): a tensor-parallel group must "
                          "not span nodes")
    try:
        dims = ParallelDims(cluster.world_size, tp, parallel.pipeline_parallel)
        micro_batches_per_rank(data.global_batch_size, data.micro_batch_size, dims.dp)
    except ConfigError as err:
        raise ConfigError(f"cluster.nodes x gpus_per_node = {cluster.nodes} x {per_node}: "
                          f"{err}") from None
