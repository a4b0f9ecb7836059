"""Job definition -> Kubernetes objects -> YAML, as kustomize directories or one stream.

:func:`render_job` checks the whole job (cluster section, every stage's layout) before it builds
anything. The output is deterministic: objects are plain dicts dumped with sorted keys, so the
golden files under ``k8s/golden`` compare byte for byte. A ``--out`` tree holds one directory
per stage plus ``services/`` (data volume, MLflow server), each a ``kubectl apply -k`` target;
ConfigMaps are written as files (``run.yaml``) behind a ``configMapGenerator`` without a name
hash, so the workloads reference them by a fixed name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omnidiff import ConfigError
from omnidiff.jobs.curriculum import JobConfig
from omnidiff.k8s import pod
from omnidiff.k8s.config import ClusterConfig, load_cluster
from omnidiff.k8s.plan import StagePlan, plan_job
from omnidiff.k8s.services import services
from omnidiff.k8s.workloads import WORKLOADS, metadata

SERVICES_DIR = "services"


@dataclass
class RenderedJob:
    """A job's objects: the shared services, then each stage's (ConfigMap first)."""

    job: JobConfig
    cluster: ClusterConfig
    plans: list[StagePlan]
    services: list[dict[str, Any]]
    stages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by stage name


def render_job(job: JobConfig, kind: str | None = None) -> RenderedJob:
    """Every object of every stage; raises one :class:`ConfigError` line on a bad job."""
    cluster = load_cluster(job, kind)
    if any(stage.name == SERVICES_DIR for stage in job.stages):
        raise ConfigError(f"job {job.name}: a stage may not be called {SERVICES_DIR} (the "
                          "folder of the shared services)")
    plans = plan_job(job, cluster)
    rendered = RenderedJob(job, cluster, plans, services(job.name, cluster))
    build = WORKLOADS[cluster.kind].build
    for plan in plans:
        rendered.stages[plan.stage] = [config_map(job.name, plan, cluster),
                                       *build(job.name, plan, cluster)]
    return rendered


def config_map(job: str, plan: StagePlan, cluster: ClusterConfig) -> dict[str, Any]:
    """The stage's run config, as the file the pod reads."""
    text = yaml.safe_dump(plan.run_config, sort_keys=False)
    return {"apiVersion": "v1", "data": {pod.RUN_CONFIG_FILE: text}, "kind": "ConfigMap",
            "metadata": metadata(plan.config_map, pod.labels(job, plan), cluster.namespace)}


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the run config inside its ConfigMap), no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream, keys sorted."""
    return "".join("---\n" + dump_one(obj) for obj in objects)


def dump_one(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=1000)


def kustomize_tree(objects: list[dict[str, Any]]) -> dict[str, str]:
    """One ``kubectl apply -k`` directory: file name -> text."""
    files: dict[str, str] = {}
    resources, generators = [], []
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            meta = obj["metadata"]
            for name, text in obj["data"].items():
                if name in files:
                    raise ValueError(f"two ConfigMaps write {name}")
                files[name] = text
            generators.append({"files": sorted(obj["data"]), "name": meta["name"],
                               "namespace": meta["namespace"],
                               "options": {"disableNameSuffixHash": True,
                                           "labels": meta["labels"]}})
        else:
            name = f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
            files[name] = dump_one(obj)
            resources.append(name)
    kustomization: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1",
                                     "kind": "Kustomization", "resources": resources}
    if generators:
        kustomization["configMapGenerator"] = generators
    files["kustomization.yaml"] = dump_one(kustomization)
    return files


def output_tree(rendered: RenderedJob, plans: list[StagePlan]) -> dict[str, str]:
    """The ``--out`` tree of ``plans``' stages and the services: relative path -> text."""
    tree: dict[str, str] = {}
    parts = [(SERVICES_DIR, rendered.services)] if rendered.services else []
    parts += [(plan.stage, rendered.stages[plan.stage]) for plan in plans]
    for folder, objects in parts:
        for name, text in kustomize_tree(objects).items():
            tree[f"{folder}/{name}"] = text
    return tree


def write_tree(tree: dict[str, str], out: Path) -> list[Path]:
    """Write ``tree`` below ``out`` (existing files of the same names are replaced)."""
    written = []
    for relative, text in sorted(tree.items()):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
