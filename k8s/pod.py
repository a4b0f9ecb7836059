"""The pieces every training pod has, whichever workload kind carries it.

One container runs ``omnidiff launch -- train <run config>`` (see :mod:`omnidiff.k8s.launch`);
the pod mounts a memory-backed ``/dev/shm``, the shared volume and the stage's run config, runs
under the restricted Pod Security Standard, gets GPUs (and RDMA devices) per node, and reports
to MLflow with credentials from a Secret (never inline).
"""

from __future__ import annotations

from typing import Any

from omnidiff.k8s.config import ClusterConfig
from omnidiff.k8s.plan import StagePlan

CONFIG_MOUNT = "/etc/omnidiff"
RUN_CONFIG_FILE = "run.yaml"
CONTAINER_COMMAND = ["omnidiff", "launch", "--", "train", f"{CONFIG_MOUNT}/{RUN_CONFIG_FILE}"]
GPU_RESOURCE = "nvidia.com/gpu"
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
APP = "omnidiff"


def labels(job: str, plan: StagePlan | None = None, component: str | None = None
           ) -> dict[str, str]:
    """The recommended ``app.kubernetes.io`` labels of everything a job creates."""
    out = {"app.kubernetes.io/name": APP, "app.kubernetes.io/part-of": job}
    if plan is not None:
        out["app.kubernetes.io/instance"] = plan.name
        out["app.kubernetes.io/component"] = plan.stage
    elif component is not None:
        out["app.kubernetes.io/component"] = component
    return out


def workload_labels(job: str, plan: StagePlan, cluster: ClusterConfig) -> dict[str, str]:
    """Labels of the workload object itself: Kueue reads its queue here."""
    out = labels(job, plan)
    if cluster.queue:
        out["kueue.x-k8s.io/queue-name"] = cluster.queue
    return out


def env(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The node's environment: NCCL, threads, MLflow (credentials by Secret reference), the
    job's own variables. Rendezvous variables come from the operator or the workload."""
    values = {"PYTHONUNBUFFERED": "1", "NCCL_DEBUG": "WARN",
              "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
              "NCCL_IB_DISABLE": "0" if cluster.rdma else "1"}
    values.update(cluster.env)
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in values.items()]
    uri = cluster.tracking_uri()
    if uri:
        secret = cluster.mlflow.credentials_secret
        out.append({"name": "MLFLOW_TRACKING_URI", "value": uri})
        out += [secret_env("MLFLOW_TRACKING_USERNAME", secret, "username"),
                secret_env("MLFLOW_TRACKING_PASSWORD", secret, "password")]
    return out


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def resources(cluster: ClusterConfig) -> dict[str, Any]:
    """Per-node resources; requests equal limits (devices must, CPU and memory may)."""
    amounts: dict[str, Any] = {}
    if cluster.cpu:
        amounts["cpu"] = cluster.cpu
    if cluster.memory:
        amounts["memory"] = cluster.memory
    if cluster.gpus_per_node:
        amounts[GPU_RESOURCE] = cluster.gpus_per_node
    amounts.update(cluster.rdma)
    return {"limits": dict(amounts), "requests": dict(amounts)} if amounts else {}


def container_security() -> dict[str, Any]:
    """The restricted profile's container part."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def pod_security(user: int) -> dict[str, Any]:
    """The restricted profile's pod part; the shared volume is group-writable by ``user``."""
    return {"fsGroup": user, "fsGroupChangePolicy": "OnRootMismatch", "runAsGroup": user,
            "runAsNonRoot": True, "runAsUser": user,
            "seccompProfile": {"type": "RuntimeDefault"}}


def volume_mounts(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """Shared memory and the shared volume (the run config is mounted per stage)."""
    return [{"mountPath": "/dev/shm", "name": "dshm"},
            {"mountPath": cluster.storage.mount_path, "name": "data"}]


def volumes(cluster: ClusterConfig) -> list[dict[str, Any]]:
    return [{"emptyDir": {"medium": "Memory", "sizeLimit": cluster.shm_size}, "name": "dshm"},
            {"name": "data", "persistentVolumeClaim": {"claimName": cluster.storage.claim}}]


def config_mount() -> dict[str, Any]:
    return {"mountPath": CONFIG_MOUNT, "name": "run-config", "readOnly": True}


def config_volume(plan: StagePlan) -> dict[str, Any]:
    return {"configMap": {"name": plan.config_map}, "name": "run-config"}


def scheduling(cluster: ClusterConfig) -> dict[str, Any]:
    """Pod-spec fields for placement and identity: tolerations (GPU nodes' taint included),
    node selector, service account, pull secrets, grace period for a last checkpoint."""
    tolerations = [t.model_dump(exclude_none=True, by_alias=True) for t in cluster.tolerations]
    if cluster.gpus_per_node and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.insert(0, {"effect": "NoSchedule", "key": GPU_RESOURCE,
                               "operator": "Exists"})
    out: dict[str, Any] = {"terminationGracePeriodSeconds": cluster.termination_grace_seconds}
    if tolerations:
        out["tolerations"] = tolerations
    if cluster.node_selector:
        out["nodeSelector"] = dict(cluster.node_selector)
    if cluster.service_account:
        out["serviceAccountName"] = cluster.service_account
    if cluster.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": name} for name in cluster.image_pull_secrets]
    return out


def node_container(name: str, plan: StagePlan, cluster: ClusterConfig,
                   extra_env: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The training container of a full pod template (JobSet, PyTorchJob)."""
    out = {"command": list(CONTAINER_COMMAND), "env": [*extra_env, *env(cluster)],
           "image": cluster.image, "name": name, "securityContext": container_security(),
           "volumeMounts": [*volume_mounts(cluster), config_mount()]}
    if resources(cluster):
        out["resources"] = resources(cluster)
    return out


def node_pod_spec(container: dict[str, Any], plan: StagePlan | None, cluster: ClusterConfig,
                  restart_policy: str) -> dict[str, Any]:
    """A full pod spec around ``container`` (``plan`` None: no run-config volume)."""
    extra = [config_volume(plan)] if plan is not None else []
    return {"containers": [container], "restartPolicy": restart_policy,
            "securityContext": pod_security(cluster.run_as_user),
            "volumes": [*volumes(cluster), *extra], **scheduling(cluster)}
