"""Apply a job's manifests through the Kubernetes API, read stage states, chain the stages.

:class:`Cluster` wraps the three API objects of the ``kubernetes`` client it uses (core, apps,
custom objects) and nothing else, so tests drive it with a fake of the same methods. Stage
``n + 1`` of ``--stage all`` is submitted only when stage ``n`` succeeded; its run config already
names stage ``n``'s export folder on the shared volume (see :mod:`omnidiff.k8s.plan`). A stage
that fails stops the chain with its pods' last log lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from omnidiff import UserError
from omnidiff.k8s.plan import StagePlan
from omnidiff.k8s.render import RenderedJob
from omnidiff.k8s.workloads import WORKLOADS, WorkloadKind

STATES = ("not submitted", "queued", "running", "succeeded", "failed")
LOG_LINES = 50
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = 30  # seconds per API request: an unreachable server is an error, not a hang
# Custom kinds: (plural, cluster-scoped); the group and version come from apiVersion.
CUSTOM = {"ClusterTrainingRuntime": ("clustertrainingruntimes", True),
          **{w.kind: (w.plural, False) for w in WORKLOADS.values()}}
CORE = {"ConfigMap": ("core", "config_map"), "PersistentVolumeClaim":
        ("core", "persistent_volume_claim"), "Service": ("core", "service"),
        "Deployment": ("apps", "deployment"), "StatefulSet": ("apps", "stateful_set")}


class ClusterError(UserError):
    """The cluster cannot be reached or refused a request."""


class StageFailed(UserError):
    """A stage's workload failed on the cluster; the chain stops."""

    exit_code = 3


def connect() -> Cluster:
    """A :class:`Cluster` from the kubeconfig (or the pod's service account)."""
    from kubernetes import client, config

    try:
        config.load_kube_config(os.environ.get("KUBECONFIG"))  # read now, not at import
    except Exception:  # noqa: BLE001 - no usable kubeconfig: try in-cluster, then give up
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise ClusterError("no Kubernetes cluster reachable: no usable kubeconfig "
                               "(KUBECONFIG or ~/.kube/config) and not inside a cluster") from None
    settings = client.Configuration.get_default_copy()
    settings.retries = 1  # an unreachable server fails fast, and urllib3 need not say so
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    api = client.ApiClient(settings)
    return Cluster(client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api),
                   settings.host)


class Cluster:
    """The API calls the submitter makes; every failure becomes one :class:`ClusterError`."""

    def __init__(self, core: Any, apps: Any, custom: Any, host: str = "the API server") -> None:
        self.apis = {"core": core, "apps": apps}
        self.custom = custom
        self.host = host

    def _call(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs, _request_timeout=REQUEST_TIMEOUT)
        except ApiException:
            raise
        except Exception as err:  # noqa: BLE001 - connection errors of every flavour
            cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(err))
            reason = cause.group(1) if cause else type(err).__name__
            raise ClusterError(f"cannot reach the Kubernetes API at {self.host} ({what}): "
                               f"{reason}") from None

    def apply(self, obj: dict[str, Any]) -> str:
        """Create ``obj``; an existing shared object is updated (patched), an existing
        workload is an error. Returns what happened, for the user."""
        kind, meta = obj["kind"], obj["metadata"]
        what = f"{kind.lower()}/{meta['name']}"
        try:
            self._write("create", obj)
            return f"{what} created"
        except ApiException as err:
            if err.status != 409:
                raise ClusterError(f"{what}: {_reason(err)}") from None
        if kind in (w.kind for w in WORKLOADS.values()):
            raise ClusterError(f"{what} already exists in namespace {meta['namespace']}; "
                               f"delete it first (kubectl delete {what} -n {meta['namespace']})")
        if kind in ("PersistentVolumeClaim", "StatefulSet"):
            return f"{what} exists, kept"  # their specs are (mostly) immutable
        try:
            self._write("patch", obj)
        except ApiException as err:
            raise ClusterError(f"{what}: {_reason(err)}") from None
        return f"{what} updated"

    def _write(self, verb: str, obj: dict[str, Any]) -> Any:
        """``create`` or ``patch`` (a JSON merge patch: the object as we want it) ``obj``."""
        kind, meta = obj["kind"], obj["metadata"]
        # The client would pick a JSON patch (a list of operations) for a core kind's dict.
        extra = {"_content_type": MERGE_PATCH} if verb == "patch" else {}
        if kind in CORE:
            api, snake = CORE[kind]
            args = [meta["name"]] if verb == "patch" else []
            fn = getattr(self.apis[api], f"{verb}_namespaced_{snake}")
            return self._call(f"{verb} {kind}", fn, *args, namespace=meta["namespace"],
                              body=obj, **extra)
        group, version = obj["apiVersion"].split("/")
        plural, cluster_scoped = CUSTOM[kind]
        scope = "cluster" if cluster_scoped else "namespaced"
        fn = getattr(self.custom, f"{verb}_{scope}_custom_object")
        where = {} if cluster_scoped else {"namespace": meta["namespace"]}
        if verb == "patch":
            where["name"] = meta["name"]
        return self._call(f"{verb} {kind}", fn, group=group, version=version, plural=plural,
                          body=obj, **where, **extra)

    def state(self, workload: WorkloadKind, namespace: str, name: str) -> tuple[str, str]:
        """``(state, message)`` of a stage's workload: one of :data:`STATES`."""
        group, version = workload.api_version.split("/")
        try:
            obj = self._call("get", self.custom.get_namespaced_custom_object, group=group,
                             version=version, namespace=namespace, plural=workload.plural,
                             name=name)
        except ApiException as err:
            if err.status == 404:
                return "not submitted", ""
            raise ClusterError(f"{workload.kind.lower()}/{name}: {_reason(err)}") from None
        conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions", [])
                      if c.get("status") == "True"}
        for condition, state in workload.conditions.items():
            if condition in conditions:
                return state, conditions[condition].get("message", "")
        return "running", ""

    def logs_tail(self, workload: WorkloadKind, namespace: str, name: str,
                  lines: int = LOG_LINES) -> str:
        """The last ``lines`` of each failed pod's log (all pods when none is marked failed)."""
        listing = self._call("list pods", self.apis["core"].list_namespaced_pod, namespace,
                             label_selector=f"{workload.pod_label}={name}")
        pods = sorted(listing.items, key=lambda p: p.metadata.name)
        failed = [p for p in pods if p.status.phase == "Failed"] or pods
        parts = []
        for item in failed:
            try:
                text = self._call("read log", self.apis["core"].read_namespaced_pod_log,
                                  item.metadata.name, namespace, container=workload.container,
                                  tail_lines=lines)
            except ApiException as err:
                text = f"(no log: {_reason(err)})"
            parts.append(f"--- {item.metadata.name} (last {lines} lines) ---\n{text.rstrip()}")
        return "\n".join(parts) or f"(no pods of {name} left)"


def submit_stage(cluster: Cluster, rendered: RenderedJob, plan: StagePlan,
                 echo: Callable[[str], None]) -> None:
    """Apply the services (idempotent) and one stage's objects."""
    for obj in [*rendered.services, *rendered.stages[plan.stage]]:
        echo(cluster.apply(obj))


def wait(cluster: Cluster, rendered: RenderedJob, plan: StagePlan, poll_seconds: float,
         echo: Callable[[str], None], sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll until the stage succeeded; a failed stage raises :class:`StageFailed` after
    printing its pods' log tails."""
    workload, namespace = WORKLOADS[rendered.cluster.kind], rendered.cluster.namespace
    last = None
    while True:
        state, message = cluster.state(workload, namespace, plan.name)
        if state != last:
            echo(f"{plan.stage} ({plan.name}): {state}")
            last = state
        if state == "succeeded":
            return
        if state == "failed":
            echo(cluster.logs_tail(workload, namespace, plan.name))
            raise StageFailed(f"stage {plan.stage} ({workload.kind} {plan.name}) failed"
                              + (f": {_one_line(message)}" if message else "")
                              + "; its pods' last log lines are above")
        if state == "not submitted":
            raise ClusterError(f"{workload.kind} {plan.name} disappeared while waiting")
        sleep(poll_seconds)


def run_stages(cluster: Cluster, rendered: RenderedJob, plans: list[StagePlan], chain: bool,
               poll_seconds: float, echo: Callable[[str], None],
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Submit ``plans``; with ``chain``, one after the other, each once the previous one
    succeeded (a stage that already succeeded is skipped, one still running is waited for)."""
    workload, namespace = WORKLOADS[rendered.cluster.kind], rendered.cluster.namespace
    for plan in plans:
        state, _ = cluster.state(workload, namespace, plan.name)
        if state == "failed":
            raise StageFailed(f"stage {plan.stage} ({plan.name}) failed earlier; delete it "
                              f"(kubectl delete {workload.name} {plan.name} -n {namespace}) "
                              "to run it again")
        if chain and state == "succeeded":
            echo(f"{plan.stage} ({plan.name}): already succeeded, export {plan.export_dir}")
            continue
        if state == "not submitted":
            init = plan.run_config["checkpoint"].get("init_from")
            echo(f"submitting {plan.stage} ({plan.name})"
                 + (f", starting from {init}" if init else ""))
            submit_stage(cluster, rendered, plan, echo)
        elif not chain:  # touch nothing of a stage that is there
            raise ClusterError(f"{workload.name}/{plan.name} already exists in namespace "
                               f"{namespace} ({state}); delete it first (kubectl delete "
                               f"{workload.name}/{plan.name} -n {namespace})")
        if chain:
            wait(cluster, rendered, plan, poll_seconds, echo, sleep)


def stage_states(cluster: Cluster, rendered: RenderedJob) -> list[tuple[StagePlan, str, str]]:
    """Every stage with its state and the workload's message."""
    workload, namespace = WORKLOADS[rendered.cluster.kind], rendered.cluster.namespace
    return [(plan, *cluster.state(workload, namespace, plan.name)) for plan in rendered.plans]


def _reason(err: ApiException) -> str:
    """The API server's message for a refused request, on one line."""
    try:
        message = json.loads(err.body or "{}").get("message")
    except ValueError:
        message = None
    return _one_line(message or f"{err.status} {err.reason}")


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
