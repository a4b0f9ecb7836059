"""Applying, polling and chaining stages through the Kubernetes API, against a fake of the
client's core / apps / custom-objects methods (no cluster exists here); the CLI's one-line
errors when no cluster is reachable."""

import json
from types import SimpleNamespace

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from omnidiff.jobs.curriculum import load_job
from omnidiff.k8s.render import render_job
from omnidiff.k8s.submit import (Cluster, ClusterError, StageFailed, run_stages,
                                 stage_states, wait)
from omnidiff.k8s.workloads import WORKLOADS
from omnidiff.parallel.launcher import free_port
from omnidiff.platform.cli import main

PLURALS = {w.plural: w.kind for w in WORKLOADS.values()}


class FakeKube:
    """The three API objects in one: objects in a dict; a workload's status follows its
    script, one entry per read once it exists (a condition type, or None for running)."""

    def __init__(self, scripts=None, pods=(), logs=None, refuse=None):
        self.objects: dict[tuple[str, str], dict] = {}
        self.events: list[tuple] = []
        self.scripts = {name: list(steps) for name, steps in (scripts or {}).items()}
        self.pods = [SimpleNamespace(metadata=SimpleNamespace(name=n),
                                     status=SimpleNamespace(phase=p)) for n, p in pods]
        self.logs = logs or {}
        self.refuse = refuse or {}  # kind -> (status, message) for create

    def _write(self, verb, body, **kw):
        key = (body["kind"], body["metadata"]["name"])
        if verb == "patch":  # a JSON merge patch of the whole object, never a JSON patch
            assert kw["_content_type"] == "application/merge-patch+json"
        if verb == "create" and body["kind"] in self.refuse:
            status, message = self.refuse[body["kind"]]
            error = ApiException(status=status, reason="Unprocessable Entity")
            error.body = json.dumps({"message": message})
            raise error
        if verb == "create" and key in self.objects:
            raise ApiException(status=409, reason="Conflict")
        self.objects[key] = body
        self.events.append((verb, *key))

    def __getattr__(self, method):  # create_namespaced_config_map, patch_namespaced_service...
        verb, _, kind = method.partition("_namespaced_")
        if verb in ("create", "patch") and kind:
            return lambda *args, body, **kw: self._write(verb, body, **kw)
        raise AttributeError(method)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
        return self._write("create", body, **kw)

    def create_cluster_custom_object(self, group, version, plural, body, **kw):
        return self._write("create", body, **kw)

    def patch_cluster_custom_object(self, group, version, plural, name, body, **kw):
        return self._write("patch", body, **kw)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        obj = self.objects.get((PLURALS[plural], name))
        if obj is None:
            raise ApiException(status=404, reason="Not Found")
        script = self.scripts.get(name, [None])
        condition = script.pop(0) if len(script) > 1 else script[0]
        self.events.append(("get", name, condition))
        conditions = [{"type": condition, "status": "True", "message": f"{name} {condition}"}]
        return {**obj, "status": {"conditions": conditions if condition else []}}

    def list_namespaced_pod(self, namespace, label_selector, **kw):
        self.events.append(("list pods", label_selector))
        return SimpleNamespace(items=self.pods)

    def read_namespaced_pod_log(self, name, namespace, container, tail_lines, **kw):
        self.events.append(("log", name, container, tail_lines))
        return "\n".join(self.logs.get(name, "").splitlines()[-tail_lines:])


def _cluster(fake: FakeKube) -> Cluster:
    return Cluster(fake, fake, fake)


def _run(fake, kind="trainjob", stage="all"):
    rendered = render_job(load_job("omni-diffusion"), kind)
    plans = rendered.plans if stage == "all" else [rendered.plans[int(stage) - 1]]
    lines, sleeps = [], []
    run_stages(_cluster(fake), rendered, plans, chain=stage == "all", poll_seconds=7,
               echo=lines.append, sleep=sleeps.append)
    return lines, sleeps


def _created(fake, kind):
    return [e[2] for e in fake.events if e[:2] == ("create", kind)]


def test_stage_all_submits_each_stage_after_the_previous_one_succeeded():
    fake = FakeKube(scripts={"omni-diffusion-stage1": [None, None, "Complete"],
                             "omni-diffusion-stage2": ["Complete"],
                             "omni-diffusion-stage3": [None, "Complete"]})
    lines, sleeps = _run(fake)
    assert _created(fake, "TrainJob") == [f"omni-diffusion-stage{i}" for i in (1, 2, 3)]
    order = fake.events
    done1 = order.index(("get", "omni-diffusion-stage1", "Complete"))
    assert order.index(("create", "TrainJob", "omni-diffusion-stage2")) > done1
    assert order.index(("create", "ConfigMap", "omni-diffusion-stage2-config")) > done1
    assert sleeps == [7, 7, 7]  # stage 1 ran for two polls, stage 3 for one
    config = yaml.safe_load(fake.objects[("ConfigMap", "omni-diffusion-stage2-config")]["data"][
        "run.yaml"])
    assert config["checkpoint"]["init_from"] == "/data/runs/omni-diffusion/stage1/export"
    assert "submitting stage2 (omni-diffusion-stage2), starting from " \
           "/data/runs/omni-diffusion/stage1/export" in lines
    # the services are applied with every stage: created once, then kept or updated
    assert _created(fake, "PersistentVolumeClaim") == ["omnidiff-data", "omnidiff-mlflow"]
    assert lines.count("persistentvolumeclaim/omnidiff-data exists, kept") == 2
    assert lines.count("deployment/omnidiff-mlflow updated") == 2
    assert "stage3 (omni-diffusion-stage3): succeeded" in lines


@pytest.mark.parametrize("kind, failed, container", [
    ("trainjob", "Failed", "node"), ("pytorchjob", "Failed", "pytorch")])
def test_a_failed_stage_stops_the_chain_with_its_pods_log_tail(kind, failed, container):
    pods = [("omni-diffusion-stage2-node-0-0-x1", "Failed"),
            ("omni-diffusion-stage2-node-0-1-x2", "Running")]
    log = "\n".join(f"line {i}" for i in range(200)) + "\nerror: data.mixture: no such file"
    fake = FakeKube(scripts={"omni-diffusion-stage1": ["Succeeded" if kind == "pytorchjob"
                                                        else "Complete"],
                             "omni-diffusion-stage2": [None, failed]},
                    pods=pods, logs={pods[0][0]: log})
    with pytest.raises(StageFailed) as caught:
        _run(fake, kind)
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 3
    assert message.startswith(f"stage stage2 ({WORKLOADS[kind].kind} omni-diffusion-stage2) "
                              f"failed: omni-diffusion-stage2 {failed}")
    assert [e for e in fake.events if e[0] == "log"] == [("log", pods[0][0], container, 50)]
    selector = f"{WORKLOADS[kind].pod_label}=omni-diffusion-stage2"
    assert ("list pods", selector) in fake.events
    assert "omni-diffusion-stage3" not in _created(fake, WORKLOADS[kind].kind)


def test_failed_stage_report_shows_the_last_lines(capsys):
    fake = FakeKube(scripts={"omni-diffusion-stage1": ["Failed"]},
                    pods=[("p0", "Failed")], logs={"p0": "\n".join(map(str, range(120)))})
    rendered = render_job(load_job("omni-diffusion"), "jobset")
    with pytest.raises(StageFailed):
        run_stages(_cluster(fake), rendered, rendered.plans, chain=True, poll_seconds=0,
                   echo=print, sleep=lambda s: None)
    out = capsys.readouterr().out
    assert "--- p0 (last 50 lines) ---\n70\n71" in out and out.rstrip().endswith("119")
    assert "\n69\n" not in out


def test_finished_stages_are_skipped_and_a_running_one_is_waited_for():
    fake = FakeKube(scripts={"omni-diffusion-stage1": ["Complete"],
                             "omni-diffusion-stage2": [None, None, "Complete"],
                             "omni-diffusion-stage3": ["Complete"]})
    rendered = render_job(load_job("omni-diffusion"), "trainjob")
    for plan in rendered.plans[:2]:  # submitted earlier (e.g. by another session)
        fake.objects[("TrainJob", plan.name)] = rendered.stages[plan.stage][-1]
    lines, _ = _run(fake)
    assert _created(fake, "TrainJob") == ["omni-diffusion-stage3"]
    assert lines[0] == ("stage1 (omni-diffusion-stage1): already succeeded, export "
                        "/data/runs/omni-diffusion/stage1/export")
    assert lines[1:3] == ["stage2 (omni-diffusion-stage2): running",
                          "stage2 (omni-diffusion-stage2): succeeded"]


def test_one_stage_is_submitted_alone_and_never_twice():
    fake = FakeKube()
    lines, sleeps = _run(fake, "jobset", stage="2")
    assert _created(fake, "JobSet") == ["omni-diffusion-stage2"] and sleeps == []
    assert "jobset/omni-diffusion-stage2 created" in lines
    events = len(fake.events)
    with pytest.raises(ClusterError, match=r"jobset/omni-diffusion-stage2 already exists in "
                                           r"namespace omnidiff \(running\); delete it first"):
        _run(fake, "jobset", stage="2")
    assert [e[0] for e in fake.events[events:]] == ["get"]  # nothing of it was touched
    existing = fake.objects[("JobSet", "omni-diffusion-stage2")]
    with pytest.raises(ClusterError, match="already exists"):  # a race: created meanwhile
        _cluster(fake).apply(existing)
    fake.scripts["omni-diffusion-stage2"] = ["Failed"]
    with pytest.raises(StageFailed, match="failed earlier; delete it"):
        _run(fake, "jobset", stage="2")


def test_a_workload_deleted_while_waited_for_is_an_error():
    rendered = render_job(load_job("omni-diffusion"), "trainjob")
    with pytest.raises(ClusterError, match="TrainJob omni-diffusion-stage1 disappeared"):
        wait(_cluster(FakeKube()), rendered, rendered.plans[0], 0, print, lambda s: None)


def test_a_refused_object_is_one_line_with_the_servers_reason():
    fake = FakeKube(refuse={"TrainJob": (422, "TrainJob.trainer.kubeflow.org \"x\" is invalid:\n"
                                              "  spec.trainer.numNodes: must be positive")})
    with pytest.raises(ClusterError) as caught:
        _run(fake, stage="1")
    assert str(caught.value) == ('trainjob/omni-diffusion-stage1: TrainJob.trainer.kubeflow.org '
                                 '"x" is invalid: spec.trainer.numNodes: must be positive')


@pytest.mark.parametrize("kind", list(WORKLOADS))
def test_status_reads_each_stage_state(kind):
    done = {"trainjob": "Complete", "jobset": "Completed", "pytorchjob": "Succeeded"}[kind]
    rendered = render_job(load_job("omni-diffusion"), kind)
    fake = FakeKube(scripts={"omni-diffusion-stage1": [done],
                             "omni-diffusion-stage2": ["Suspended"]})
    for plan in rendered.plans[:2]:
        fake.objects[(WORKLOADS[kind].kind, plan.name)] = rendered.stages[plan.stage][-1]
    states = [(plan.stage, state) for plan, state, _ in stage_states(_cluster(fake), rendered)]
    assert states == [("stage1", "succeeded"), ("stage2", "queued"),
                      ("stage3", "not submitted")]
    fake.scripts["omni-diffusion-stage2"] = [None]
    assert stage_states(_cluster(fake), rendered)[1][1] == "running"


def test_no_reachable_cluster_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert main(["status", "omni-diffusion"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: no Kubernetes cluster reachable: no usable kubeconfig (KUBECONFIG or "
                   "~/.kube/config) and not inside a cluster\n")

    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "here",
                  "clusters": [{"name": "here", "cluster": {"server": server}}],
                  "contexts": [{"name": "here", "context": {"cluster": "here", "user": "me"}}],
                  "users": [{"name": "me", "user": {"token": "t"}}]}
    (tmp_path / "config").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    assert main(["submit", "omni-diffusion", "--stage", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot reach the Kubernetes API at {server} (get): Connection refused\n"
