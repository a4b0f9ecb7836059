"""The ``cluster:`` section of a job file: where and how the job's stages run on Kubernetes.

``jobs/`` keeps the section as a raw mapping (``JobConfig.cluster``); this floor owns its meaning.
:func:`load_cluster` validates it into a :class:`ClusterConfig`, or raises one
:class:`~omnidiff.ConfigError` line naming the ``cluster.<key>``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic.alias_generators import to_camel

from omnidiff import ConfigError, ConfigSection
from omnidiff.jobs.curriculum import JobConfig

KINDS = ("trainjob", "jobset", "pytorchjob")
Kind = Literal["trainjob", "jobset", "pytorchjob"]

MLFLOW_PORT = 5000
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # RFC 1123 label: namespaces, claims, secrets
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the operators or by `omnidiff launch` itself: a job may not set them.
RESERVED_ENV = frozenset({
    "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK",
    "LOCAL_WORLD_SIZE", "JOB_COMPLETION_INDEX", "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"})


class Toleration(ConfigSection):
    """A pod toleration, with the Kubernetes field names (``tolerationSeconds``)."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class StorageSpec(ConfigSection):
    """The shared volume (a PVC) every node mounts: data, checkpoints, exports."""

    claim: str = Field("omnidiff-data", pattern=DNS_LABEL, max_length=63)
    mount_path: str = Field("/data", pattern=r"^/")
    create: bool = True  # the manifests include the claim (else it must exist)
    size: str = "10Ti"
    storage_class: str | None = None
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"] = "ReadWriteMany"


class PostgresSpec(ConfigSection):
    """The MLflow server's PostgreSQL store; credentials from ``secret`` (username, password)."""

    image: str = "postgres:17"
    storage_size: str = "20Gi"
    secret: str = Field("omnidiff-mlflow-postgres", pattern=DNS_LABEL)


class MlflowServerSpec(ConfigSection):
    """A shared MLflow tracking server in the namespace (basic auth, PostgreSQL store).

    ``admin_secret`` holds ``username``, ``password`` and ``flask-secret-key``; artifacts go to
    ``artifacts_destination`` (an object store URI) or, by default, the server's own volume.
    """

    name: str = Field("omnidiff-mlflow", pattern=DNS_LABEL, max_length=40)
    image: str | None = None  # default: the cluster image (it carries mlflow[auth,db])
    storage_size: str = "50Gi"
    storage_class: str | None = None
    artifacts_destination: str | None = None
    admin_secret: str = Field("omnidiff-mlflow-admin", pattern=DNS_LABEL)
    allowed_hosts: list[str] = Field(default_factory=list)  # extra Host headers (an ingress)
    postgres: PostgresSpec = Field(default_factory=PostgresSpec)


class MlflowSpec(ConfigSection):
    """Where the nodes report: ``tracking_uri`` (default: the in-cluster server) with the
    credentials of ``credentials_secret`` (keys ``username``, ``password``)."""

    tracking_uri: str | None = None
    credentials_secret: str = Field("omnidiff-mlflow-client", pattern=DNS_LABEL)
    server: MlflowServerSpec | None = Field(default_factory=MlflowServerSpec)

    @model_validator(mode="after")
    def _needs_a_server(self) -> MlflowSpec:
        if self.tracking_uri is None and self.server is None:
            raise ValueError("set tracking_uri, or server (the in-cluster MLflow server)")
        return self


class ClusterConfig(ConfigSection):
    """Nodes x processes per node, the image, scheduling, storage, tracking, failure policy."""

    image: str = Field(min_length=1)
    kind: Kind = "trainjob"
    namespace: str = Field("omnidiff", pattern=DNS_LABEL, max_length=63)
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=0)
    nproc_per_node: int | None = Field(None, ge=1)  # default: one per GPU (1 without GPUs)
    queue: str | None = Field(None, pattern=DNS_LABEL)  # Kueue LocalQueue
    cpu: str | None = None  # per node, a Kubernetes quantity
    memory: str | None = None
    shm_size: str = "64Gi"
    rdma: dict[str, int] = Field(default_factory=dict)  # extra device resources, {"rdma/ib": 1}
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    mlflow: MlflowSpec | None = Field(default_factory=MlflowSpec)
    max_restarts: int = Field(3, ge=0)
    active_deadline_seconds: int | None = Field(None, gt=0)
    termination_grace_seconds: int = Field(300, ge=0)
    run_as_user: int = Field(10001, ge=1)  # the image's non-root user
    service_account: str | None = None
    image_pull_secrets: list[str] = Field(default_factory=list)

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name in RESERVED_ENV:
                raise ValueError(f"{name} is set by the launcher or the platform, not by a job")
        return env

    @field_validator("rdma")
    @classmethod
    def _check_rdma(cls, rdma: dict[str, int]) -> dict[str, int]:
        for name, count in rdma.items():
            if "/" not in name or count < 1:
                raise ValueError(f"{name}: expected a device resource name (vendor/device) "
                                 "with a positive count per node")
        return rdma

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def tracking_uri(self) -> str | None:
        """The URI the nodes report to (None: no MLflow)."""
        if self.mlflow is None:
            return None
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"http://{self.mlflow.server.name}.{self.namespace}.svc:{MLFLOW_PORT}"

    @model_validator(mode="after")
    def _one_process_per_gpu(self) -> ClusterConfig:
        if self.gpus_per_node and self.procs_per_node != self.gpus_per_node:
            raise ValueError(f"nproc_per_node ({self.nproc_per_node}) must equal gpus_per_node "
                             f"({self.gpus_per_node}): one process per GPU")
        return self


def one_line(err: ValidationError, prefix: str) -> str:
    """A pydantic error as one line, each problem as ``prefix.key: message``."""
    problems = []
    for item in err.errors():
        where = ".".join([prefix, *(str(p) for p in item["loc"])])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{where}: {message.removeprefix('Value error, ')}")
    return "; ".join(problems)


def validate_section(model: type[BaseModel], raw: object, prefix: str):
    """``model`` from ``raw``, or a :class:`ConfigError` line naming ``prefix.key``."""
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        raise ConfigError(one_line(err, prefix)) from None


def load_cluster(job: JobConfig, kind: str | None = None) -> ClusterConfig:
    """The job's cluster section, optionally with another workload ``kind``."""
    raw = dict(job.cluster)
    if kind is not None:
        raw["kind"] = kind
    try:
        return validate_section(ClusterConfig, raw, "cluster")
    except ConfigError as err:
        raise ConfigError(f"job {job.name}: {err}") from None
