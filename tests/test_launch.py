"""The launch contract: whatever variables an operator injects, every node runs the same command.

The slow test renders a 2-node stage of a tiny job as a JobSet, then runs, over loopback, both
nodes' container commands with the environment the manifest gives each pod, and checks that the
stage trains exactly like one node with two processes.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from omnidiff.jobs.curriculum import load_job
from omnidiff.k8s import pod
from omnidiff.k8s.launch import LaunchError, rendezvous, torchrun_argv
from omnidiff.k8s.render import render_job
from omnidiff.monitoring.metrics import read_metrics
from omnidiff.parallel.launcher import free_port
from omnidiff.platform.cli import main

REPO = Path(__file__).resolve().parents[1]
# What each operator injects into node 1 of a 2-node job (from their controllers' source).
TRAINJOB_ENV = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
                "PET_MASTER_ADDR": "j-node-0-0.j", "PET_MASTER_PORT": "29400"}
PYTORCHJOB_ENV = {"MASTER_ADDR": "j-master-0", "MASTER_PORT": "23456", "PET_MASTER_ADDR":
                  "j-master-0", "PET_MASTER_PORT": "23456", "WORLD_SIZE": "16", "RANK": "1",
                  "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "8", "PET_NNODES": "2"}
PLAIN_ENV = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "head", "MASTER_PORT": "1234",
             "NPROC_PER_NODE": "8"}
INDEXED_JOB_ENV = {"NNODES": "2", "JOB_COMPLETION_INDEX": "1", "MASTER_ADDR": "head"}


@pytest.mark.parametrize("env, expected", [
    (TRAINJOB_ENV, ("2", "1", "j-node-0-0.j", "29400", "8")),
    (PYTORCHJOB_ENV, ("2", "1", "j-master-0", "23456", "8")),
    (PLAIN_ENV, ("2", "1", "head", "1234", "8")),
    (INDEXED_JOB_ENV, ("2", "1", "head", "29500", "auto")),
    ({}, ("1", "0", "127.0.0.1", "29500", "auto")),
], ids=["trainjob", "pytorchjob", "plain", "indexed-job", "nothing"])
def test_each_operators_variables_map_to_torchrun(env, expected):
    options = rendezvous(env)
    assert tuple(options.values()) == expected
    argv = torchrun_argv(env, ["train", "run.yaml"])
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert argv[-4:] == ["-m", "omnidiff.platform.cli", "train", "run.yaml"]
    assert f"--node_rank={expected[1]}" in argv and f"--master_addr={expected[2]}" in argv


def test_pet_variables_win_over_plain_ones():
    env = {**PLAIN_ENV, "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "pet-head"}
    assert rendezvous(env)["node_rank"] == "0"
    assert rendezvous(env)["master_addr"] == "pet-head"


@pytest.mark.parametrize("env, message", [
    ({"PET_NNODES": "2", "PET_NODE_RANK": "2"}, "node rank 2 is outside a job of 2 node(s)"),
    ({"PET_NNODES": "1:4"}, "PET_NNODES='1:4': expected a whole number for --nnodes"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http': expected a whole number"),
    ({"PET_NPROC_PER_NODE": "0"}, "nproc_per_node '0': expected a positive number"),
])
def test_a_bad_environment_is_one_line(env, message):
    with pytest.raises(LaunchError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        rendezvous(env)


def test_launch_command_prints_the_torchrun_invocation(capsys, monkeypatch):
    for name, value in TRAINJOB_ENV.items():
        monkeypatch.setenv(name, value)
    assert main(["launch", "--print", "--", "train", "/etc/omnidiff/run.yaml"]) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed == torchrun_argv(TRAINJOB_ENV, ["train", "/etc/omnidiff/run.yaml"])
    assert main(["launch", "--print"]) == 2  # nothing to launch: one error line


# ---- two nodes over loopback --------------------------------------------------------------
TINY_RUN = {
    "seed": 1234,
    "model": {"preset": "tiny", "num_layers": 2},
    "data": {"source": "synthetic", "seq_length": 64, "image_codebook_size": 64,
             "speech_codebook_size": 64, "micro_batch_size": 1, "global_batch_size": 4},
    "parallel": {"zero_stage": 1},
    "schedule": {"train_steps": 3},
    "logging": {"log_interval": 1, "progress_bar": False},
}


def _tiny_job(tmp_path: Path) -> Path:
    """A one-stage tiny job on 2 CPU nodes x 1 process (DP 2), its volume under tmp_path."""
    volume = tmp_path / "volume"
    job = {"name": "tiny", "output_dir": str(volume / "runs"), "run": TINY_RUN,
           "stages": [{"name": "stage1"}],
           "cluster": {"image": "omnidiff:test", "kind": "jobset", "nodes": 2,
                       "gpus_per_node": 0, "nproc_per_node": 1, "mlflow": None,
                       "env": {"OMP_NUM_THREADS": "1"},
                       "storage": {"mount_path": str(volume), "create": False}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _pod_env(container: dict, node: int) -> dict[str, str]:
    """The variables Kubernetes gives ``node``'s container: the manifest's values, the
    completion index by field reference, and the index an indexed Job sets itself."""
    env = {"JOB_COMPLETION_INDEX": str(node)}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == pod.COMPLETION_INDEX_FIELD
            env[item["name"]] = str(node)
    return env


@pytest.mark.slow
def test_two_node_stage_trains_like_one_node_with_two_processes(tmp_path):
    rendered = render_job(load_job(_tiny_job(tmp_path)))
    config_map, jobset = rendered.stages["stage1"]
    job_spec = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job_spec["completions"] == job_spec["parallelism"] == 2
    container = job_spec["template"]["spec"]["containers"][0]

    mounted = tmp_path / "etc-omnidiff"  # the ConfigMap volume, where the pod mounts it
    mounted.mkdir()
    for name, text in config_map["data"].items():
        (mounted / name).write_text(text)
    command = [part.replace(pod.CONFIG_MOUNT, str(mounted)) for part in container["command"]]
    assert command[0] == "omnidiff"
    node_command = [sys.executable, "-m", "omnidiff.platform.cli", *command[1:]]

    base = {k: v for k, v in os.environ.items()
            if not k.startswith("PET_") and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK",
                                                      "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")}
    port = str(free_port())  # each pod has its own network; here the nodes share the host's
    reference_dir = tmp_path / "reference"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "omnidiff.platform.cli", "train", str(mounted / pod.RUN_CONFIG_FILE),
         "parallel.nproc_per_node=2", f"output_dir={reference_dir}"],
        cwd=REPO, env={**base, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)]
    for node in range(2):
        env = {**base, **_pod_env(container, node)}
        assert env["PET_MASTER_ADDR"] == "tiny-stage1-node-0-0.tiny-stage1"
        env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port)  # host name -> loopback
        procs.append(subprocess.Popen(node_command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]

    stage_dir = Path(rendered.plans[0].output_dir)
    two_nodes = [row["loss"] for row in read_metrics(stage_dir)]
    one_node = [row["loss"] for row in read_metrics(reference_dir)]
    assert len(two_nodes) == 3
    assert two_nodes == one_node  # exactly: same ranks, same data, same reductions
    shards = sorted(p.name for p in (stage_dir / "checkpoints" / "step_00000003").iterdir())
    assert shards == ["meta.json", "rank00000.pt", "rank00001.pt"]  # one world of two ranks
    assert "trained 3 steps" in outputs[1] and "trained 3 steps" not in outputs[2]
