"""Generated manifests: valid offline (core schemas strict, CRD schemas strict), golden files
byte for byte, kustomize-buildable, restricted pods, secrets by reference, stage hand-over, and
broken jobs refused in one line before anything is written."""

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from omnidiff.jobs.curriculum import load_job
from omnidiff.k8s import pod
from omnidiff.k8s.render import output_tree, render_job
from omnidiff.k8s.validate import ManifestError, pod_templates, validate
from omnidiff.platform.cli import main

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "k8s" / "golden" / "omni-diffusion"
KINDS = ("trainjob", "jobset", "pytorchjob")
# A small CPU variant: one node, no GPUs, an external MLflow, an existing claim.
CPU_CLUSTER = {"image": "omnidiff:cpu", "nodes": 1, "gpus_per_node": 0, "nproc_per_node": 4,
               "namespace": "research", "tolerations": [{"key": "spot", "operator": "Exists"}],
               "mlflow": {"tracking_uri": "https://mlflow.example.com", "server": None},
               "storage": {"create": False, "claim": "shared"}}


def _production(kind: str):
    return render_job(load_job("omni-diffusion"), kind)


def _cpu_variant(kind: str):
    job = load_job("omni-diffusion")
    job.cluster = CPU_CLUSTER
    job.run["parallel"]["tensor_parallel"] = 2
    return render_job(job, kind)


def _objects(rendered) -> list[dict]:
    return [*rendered.services, *(o for objs in rendered.stages.values() for o in objs)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", [_production, _cpu_variant], ids=["production", "cpu"])
def test_every_object_validates_offline(kind, variant):
    pytest.importorskip("kubernetes_validate")
    objects = _objects(variant(kind))
    kinds = {obj["kind"] for obj in objects}
    assert {"ConfigMap", {"trainjob": "TrainJob", "jobset": "JobSet",
                          "pytorchjob": "PyTorchJob"}[kind]} <= kinds
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize("path, value, message", [
    (("spec", "trainer", "gpus"), 8, "spec.trainer: Additional properties are not allowed"),
    (("spec", "trainer", "numNodes"), "4", "spec.trainer.numNodes: '4' is not of type"),
    (("spec", "runtimeRef", "name"), None, "spec.runtimeRef.name: None is not of type"),
    (("metadata", "labels", "team"), 7, "metadata.labels.team: 7 is not of type"),
])
def test_the_validator_refuses_what_the_api_server_would(path, value, message):
    pytest.importorskip("kubernetes_validate")
    trainjob = copy.deepcopy(_production("trainjob").stages["stage1"][-1])
    node = trainjob
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ManifestError, match=f"^TrainJob/omni-diffusion-stage1: {message}"):
        validate(trainjob)


def test_embedded_pod_templates_are_checked_with_the_core_schema():
    pytest.importorskip("kubernetes_validate")
    jobset = copy.deepcopy(_production("jobset").stages["stage1"][-1])
    [(where, template)] = pod_templates(jobset)
    assert where == ".spec.replicatedJobs[0].template.spec.template"
    template["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "lots"
    with pytest.raises(ManifestError, match="resources.limits.cpu: 'lots' does not match"):
        validate(jobset)


@pytest.mark.parametrize("kind", KINDS)
def test_golden_manifests_regenerate_byte_for_byte(kind):
    rendered = _production(kind)
    tree = output_tree(rendered, rendered.plans)
    golden = {str(p.relative_to(GOLDEN / kind)): p.read_text()
              for p in sorted((GOLDEN / kind).rglob("*")) if p.is_file()}
    assert sorted(tree) == sorted(golden)
    for name, text in tree.items():
        assert text == golden[name], f"{kind}/{name} differs from k8s/golden (regenerate with " \
            f"omnidiff submit omni-diffusion --stage all --dry-run --kind {kind} --out ...)"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) absent")
def test_kustomize_builds_exactly_the_objects_the_client_applies():
    rendered = _production("trainjob")
    for folder, objects in [("services", rendered.services), ("stage2", rendered.stages["stage2"])]:
        built = subprocess.run(["kubectl", "kustomize", str(GOLDEN / "trainjob" / folder)],
                               capture_output=True, text=True, timeout=120, check=True).stdout
        key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
        assert sorted(yaml.safe_load_all(built), key=key) == sorted(objects, key=key), folder


def _pod_specs(objects):
    for obj in objects:
        for _, template in pod_templates(obj):
            yield obj, template["spec"]
        if obj["kind"] in ("Deployment", "StatefulSet"):
            yield obj, obj["spec"]["template"]["spec"]


@pytest.mark.parametrize("kind", KINDS)
def test_pods_run_restricted_with_shm_volume_gpus_and_secret_references(kind):
    rendered = _production(kind)
    objects = _objects(rendered)
    specs = list(_pod_specs(objects))
    assert len(specs) >= 3
    for _, spec in specs:
        security = spec["securityContext"]
        assert security["runAsNonRoot"] and security["seccompProfile"]["type"] == "RuntimeDefault"
        for container in spec["containers"]:
            assert container["securityContext"] == pod.container_security()
    env = []
    for obj in objects:  # every env entry, wherever it sits (a TrainJob's is not in a pod)
        env += [e for e in _find(obj, "env") for e in e]
    secrets = [e for e in env if any(w in e["name"] for w in ("PASSWORD", "USERNAME", "SECRET"))]
    assert secrets and all("secretKeyRef" in e["valueFrom"] and "value" not in e for e in secrets)
    stage = rendered.stages["stage1"]
    text = yaml.safe_dump(stage)
    assert "medium: Memory" in text and "claimName: omnidiff-data" in text
    assert "nvidia.com/gpu: 8" in text and "rdma/ib: 1" in text
    assert "nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3" in text
    assert stage[-1]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "omnidiff-h100"
    uri = [e["value"] for e in env if e["name"] == "MLFLOW_TRACKING_URI"]
    assert uri and set(uri) == {"http://omnidiff-mlflow.omnidiff.svc:5000"}


def _find(node, key):
    if isinstance(node, dict):
        if key in node:
            yield node[key]
        for value in node.values():
            yield from _find(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _find(value, key)


def test_each_stage_starts_from_the_previous_stage_export():
    rendered = _production("trainjob")
    configs = [yaml.safe_load(rendered.stages[p.stage][0]["data"]["run.yaml"])
               for p in rendered.plans]
    assert [c["output_dir"] for c in configs] == [f"/data/runs/omni-diffusion/stage{i}"
                                                  for i in (1, 2, 3)]
    assert [c["checkpoint"]["init_from"] for c in configs] == [
        "/data/models/Dream-v0-Instruct-7B", "/data/runs/omni-diffusion/stage1/export",
        "/data/runs/omni-diffusion/stage2/export"]
    assert all(c["checkpoint"]["resume"] == "auto" for c in configs)
    assert all(c["parallel"]["nproc_per_node"] == 8 for c in configs)
    assert [c["optimizer"]["lr"] for c in configs] == [1e-4, 1e-4, 1e-5]


def test_kinds_carry_the_rendezvous_their_operator_does_not():
    jobset = _production("jobset").stages["stage1"][-1]
    container = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]
    names = [e["name"] for e in container["env"]]
    assert names[:5] == ["PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                         "PET_MASTER_PORT"]
    trainjob = _production("trainjob").stages["stage1"][-1]
    assert not any(e["name"].startswith("PET_") for e in trainjob["spec"]["trainer"]["env"])
    assert trainjob["spec"]["trainer"]["numNodes"] == 4
    pytorchjob = _production("pytorchjob").stages["stage1"][-1]
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert "Worker" not in _cpu_variant("pytorchjob").stages["stage1"][-1]["spec"][
        "pytorchReplicaSpecs"]  # a one-node job is its master alone


def _broken(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load((REPO / "jobs" / "curricula" / "omni-diffusion.yaml").read_text())
    change(raw)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda j: j["cluster"].update(gpus_per_node=6),
     "stage stage1: parallel.tensor_parallel (4) must divide the processes per node "
     "(cluster.gpus_per_node 6)"),
    (lambda j: j["cluster"].update(nodes=3),
     "stage stage1: cluster.nodes x gpus_per_node = 3 x 8: data.global_batch_size (128) must be "
     "a multiple of data.micro_batch_size x data-parallel size (1 x 6)"),
    (lambda j: j["run"]["parallel"].update(pipeline_parallel=3),
     "stage stage1: parallel.pipeline_parallel (3) must divide model.num_layers (28)"),
    (lambda j: j["run"]["parallel"].update(pipeline_parallel=7),
     "world size 32 is not a multiple of parallel.tensor_parallel x parallel.pipeline_parallel "
     "= 4 x 7"),
    (lambda j: j["cluster"].pop("image"), "cluster.image: Field required"),
    (lambda j: j.update(output_dir="/scratch/runs"),
     "output_dir /scratch/runs/stage1 must lie on the shared volume"),
    (lambda j: j["cluster"]["env"].update(MASTER_ADDR="x"),
     "cluster.env: MASTER_ADDR is set by the launcher or the platform"),
])
def test_a_broken_job_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys,
                                                                        change, message):
    out = tmp_path / "out"
    code = main(["submit", str(_broken(tmp_path, change)), "--stage", "all", "--dry-run",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: job omni-diffusion") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


def test_dry_run_prints_or_writes_exactly_what_would_be_applied(tmp_path, capsys):
    pytest.importorskip("kubernetes_validate")
    rendered = _production("jobset")
    assert main(["submit", "omni-diffusion", "--stage", "2", "--kind", "jobset",
                 "--dry-run"]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == [*rendered.services, *rendered.stages["stage2"]]
    assert main(["submit", "omni-diffusion", "--stage", "stage3", "--kind", "jobset",
                 "--dry-run", "--validate", "--out", str(tmp_path)]) == 0
    written = {str(p.relative_to(tmp_path)): p.read_text()
               for p in tmp_path.rglob("*") if p.is_file()}
    assert written == output_tree(rendered, rendered.plans[2:])
    assert main(["submit", "omni-diffusion", "--stage", "4", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: --stage 4: expected all or one of 1 (stage1)")
