"""The three workload kinds a stage can run as, and what the cluster client needs to know of each.

- ``trainjob``: Kubeflow Trainer v2 ``TrainJob`` on a per-job ``ClusterTrainingRuntime`` with
  the torch ML policy. The Trainer injects the rendezvous (``PET_*``); the runtime holds the pod
  settings every stage shares, a runtime patch adds the stage's run config.
- ``jobset``: a ``JobSet`` of one indexed Job with ``nodes`` pods; the manifest itself carries
  the rendezvous, the node rank comes from the pod's completion index.
- ``pytorchjob``: the legacy Kubeflow ``PyTorchJob`` (one Master, ``nodes - 1`` Workers); the
  training operator injects the rendezvous.

Every kind runs the same container command; :mod:`omnidiff.k8s.launch` reads whichever
variables are there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omnidiff import ConfigError
from omnidiff.k8s import pod
from omnidiff.k8s.config import ClusterConfig
from omnidiff.k8s.plan import StagePlan

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
PYTORCHJOB_API = "kubeflow.org/v1"
NODE = "node"  # the Trainer's replicated job and container name (and ours in a JobSet)
TRAINER_PORT = 29400  # the Trainer's rendezvous port; the JobSet uses the same
PYTORCHJOB_PORT = 23456  # the training operator's default master port
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"


@dataclass(frozen=True)
class WorkloadKind:
    """A workload kind: how to build it, and how to read its state and find its pods."""

    name: str
    kind: str
    api_version: str
    plural: str
    container: str  # the training container, for logs
    pod_label: str  # pods carry <pod_label>=<workload name>
    conditions: dict[str, str]  # condition type (status True) -> state, first match wins
    build: Callable[[str, StagePlan, ClusterConfig], list[dict[str, Any]]]


def metadata(name: str, labels: dict[str, str], namespace: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"labels": labels, "name": name}
    if namespace is not None:
        out["namespace"] = namespace
    return out


def runtime_name(job: str, cluster: ClusterConfig) -> str:
    """The job's ClusterTrainingRuntime (cluster-scoped, so the namespace is in its name)."""
    name = f"{job}-{cluster.namespace}"
    if len(name) > 63:
        raise ConfigError(f"job {job}: runtime name {name!r} (job-namespace) is longer than 63 "
                          "characters; shorten the job name or cluster.namespace")
    return name


def cluster_training_runtime(job: str, cluster: ClusterConfig) -> dict[str, Any]:
    """The pod settings every stage shares, under the torch ML policy."""
    container = {"image": cluster.image, "name": NODE,
                 "securityContext": pod.container_security(),
                 "volumeMounts": pod.volume_mounts(cluster)}
    node_job = {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step":
                                        "trainer"}},
                "spec": {"backoffLimit": 0, "template": {
                    "spec": pod.node_pod_spec(container, None, cluster, "Never")}}}
    spec = {"mlPolicy": {"numNodes": cluster.nodes, "torch": {}},
            "template": {"spec": {"failurePolicy": {"maxRestarts": cluster.max_restarts},
                                  "replicatedJobs": [{"name": NODE, "template": node_job}]}}}
    labels = {**pod.labels(job, component="runtime"), "trainer.kubeflow.org/framework": "torch"}
    return {"apiVersion": TRAINER_API, "kind": "ClusterTrainingRuntime",
            "metadata": metadata(runtime_name(job, cluster), labels, None), "spec": spec}


def trainjob(job: str, plan: StagePlan, cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The stage's TrainJob (and the runtime it references)."""
    trainer: dict[str, Any] = {"command": list(pod.CONTAINER_COMMAND), "env": pod.env(cluster),
                               "image": cluster.image, "numNodes": cluster.nodes,
                               "numProcPerNode": cluster.procs_per_node}
    if pod.resources(cluster):
        trainer["resourcesPerNode"] = pod.resources(cluster)
    pod_patch = {"metadata": {"labels": pod.labels(job, plan)},
                 "spec": {"containers": [{"name": NODE, "volumeMounts": [pod.config_mount()]}],
                          "volumes": [pod.config_volume(plan)]}}
    patch = {"manager": "omnidiff", "trainingRuntimeSpec": {"template": {"spec": {
        "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": pod_patch}}}]}}}}
    spec: dict[str, Any] = {
        "runtimePatches": [patch],
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                       "name": runtime_name(job, cluster)},
        "trainer": trainer}
    if cluster.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = cluster.active_deadline_seconds
    return [cluster_training_runtime(job, cluster),
            {"apiVersion": TRAINER_API, "kind": "TrainJob",
             "metadata": metadata(plan.name, pod.workload_labels(job, plan, cluster),
                                  cluster.namespace), "spec": spec}]


def jobset(job: str, plan: StagePlan, cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The stage's JobSet: one indexed Job, a pod per node, rendezvous in the manifest."""
    rendezvous = [
        {"name": "PET_NNODES", "value": str(cluster.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(cluster.procs_per_node)},
        {"name": "PET_NODE_RANK",
         "valueFrom": {"fieldRef": {"fieldPath": pod.COMPLETION_INDEX_FIELD}}},
        # JobSet host names: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
        {"name": "PET_MASTER_ADDR", "value": f"{plan.name}-{NODE}-0-0.{plan.name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)}]
    container = pod.node_container(NODE, plan, cluster, rendezvous)
    container["ports"] = [{"containerPort": TRAINER_PORT, "name": "rendezvous"}]
    job_spec = {"backoffLimit": 0, "completionMode": "Indexed", "completions": cluster.nodes,
                "parallelism": cluster.nodes,
                "template": {"metadata": {"labels": pod.labels(job, plan)},
                             "spec": pod.node_pod_spec(container, plan, cluster, "Never")}}
    spec: dict[str, Any] = {
        "failurePolicy": {"maxRestarts": cluster.max_restarts},
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "replicatedJobs": [{"name": NODE, "replicas": 1, "template": {"spec": job_spec}}],
        "successPolicy": {"operator": "All"}}
    if cluster.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = cluster.active_deadline_seconds
    return [{"apiVersion": JOBSET_API, "kind": "JobSet",
             "metadata": metadata(plan.name, pod.workload_labels(job, plan, cluster),
                                  cluster.namespace), "spec": spec}]


def pytorchjob(job: str, plan: StagePlan, cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The stage's PyTorchJob: Master (node 0) + Workers; pods restart on failure."""
    container = pod.node_container("pytorch", plan, cluster)
    container["ports"] = [{"containerPort": PYTORCHJOB_PORT, "name": "pytorchjob-port"}]
    template = {"metadata": {"labels": pod.labels(job, plan)},
                "spec": pod.node_pod_spec(container, plan, cluster, "OnFailure")}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if cluster.nodes > 1:
        replicas["Worker"] = {"replicas": cluster.nodes - 1, "restartPolicy": "OnFailure",
                              "template": template}
    run_policy: dict[str, Any] = {"backoffLimit": cluster.max_restarts, "cleanPodPolicy": "None"}
    if cluster.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = cluster.active_deadline_seconds
    return [{"apiVersion": PYTORCHJOB_API, "kind": "PyTorchJob",
             "metadata": metadata(plan.name, pod.workload_labels(job, plan, cluster),
                                  cluster.namespace),
             "spec": {"nprocPerNode": str(cluster.procs_per_node),
                      "pytorchReplicaSpecs": replicas, "runPolicy": run_policy}}]


WORKLOADS: dict[str, WorkloadKind] = {
    "trainjob": WorkloadKind(
        "trainjob", "TrainJob", TRAINER_API, "trainjobs", NODE, JOBSET_NAME_LABEL,
        {"Failed": "failed", "Complete": "succeeded", "Suspended": "queued"}, trainjob),
    "jobset": WorkloadKind(
        "jobset", "JobSet", JOBSET_API, "jobsets", NODE, JOBSET_NAME_LABEL,
        {"Failed": "failed", "Completed": "succeeded", "Suspended": "queued"}, jobset),
    "pytorchjob": WorkloadKind(
        "pytorchjob", "PyTorchJob", PYTORCHJOB_API, "pytorchjobs", "pytorch",
        "training.kubeflow.org/job-name",
        {"Failed": "failed", "Succeeded": "succeeded", "Suspended": "queued"}, pytorchjob),
}
