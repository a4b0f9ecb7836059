"""Offline validation of generated manifests, as strict as ``kubectl apply --validate=strict``.

Core kinds go through ``kubernetes-validate`` (the API's own JSON schemas, strict mode). Custom
kinds go through their published CRD schemas (``k8s/schemas``, see ``SOURCES.md``) with
``jsonschema``, made strict the way the API server's field validation is: an unknown field is
an error wherever the schema lists the fields. Their ``metadata`` and every embedded pod
template are also checked with the core schemas (as a ConfigMap's metadata and a PodTemplate).
Needs the test extra (``kubernetes-validate``, ``jsonschema``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from omnidiff import ConfigError

SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.33"
CRD_SCHEMAS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.v1alpha1",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"):
        "trainer.kubeflow.org_clustertrainingruntimes.v1alpha1",
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.x-k8s.io_jobsets.v1alpha2",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.v1",
}


class ManifestError(ConfigError):
    """A generated object the API server would refuse."""


def validate(obj: dict[str, Any]) -> None:
    """Raise :class:`ManifestError` (one line naming the object and field) if ``obj`` is
    invalid."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if key not in CRD_SCHEMAS:
        _core(obj, where)
        return
    error = next(iter(_crd_validator(CRD_SCHEMAS[key]).iter_errors(obj)), None)
    if error is not None:
        raise ManifestError(f"{where}: {_path(error.absolute_path)}: {error.message}")
    _core({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, where)
    for path, template in pod_templates(obj):
        _core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"},
               "template": template}, f"{where} {path}")


def pod_templates(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every full pod template inside ``node`` (a ``template`` whose spec has containers with
    images; a runtime patch's partial template is not one), with its path."""
    found = []
    if isinstance(node, dict):
        template = node.get("template")
        containers = (template.get("spec") or {}).get("containers") if isinstance(
            template, dict) else None
        if containers and all("image" in container for container in containers):
            found.append((f"{path}.template", template))
        for key, value in node.items():
            found += pod_templates(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += pod_templates(value, f"{path}[{index}]")
    return found


def _core(obj: dict[str, Any], where: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        raise ManifestError(f"{where}: {_path(err.absolute_path)}: {err.message}") from None


@lru_cache(maxsize=None)
def _crd_validator(name: str):
    import jsonschema

    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "(top)"
