"""The curriculum as a job: stages chained through their exports, tracked in MLflow (a real
server on loopback), surviving a tracking server that dies and a SIGKILL in the middle.

The job is tiny (two layers, synthetic data, one process) so three stages take seconds; the
demo job itself is the README's main command.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from omnidiff.monitoring.sinks import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, uri: str | None = None, stage2_steps: int = 6) -> Path:
    logging = {"log_interval": 1, "progress_bar": False}
    if uri:
        logging["mlflow_tracking_uri"] = uri
    job = {"name": "tiny", "output_dir": str(tmp_path / "out"),
           "run": {"model": {"preset": "tiny", "num_layers": 2},
                   "data": {"seq_length": 64, "image_codebook_size": 64,
                            "speech_codebook_size": 64, "micro_batch_size": 1,
                            "global_batch_size": 2},
                   "logging": logging, "checkpoint": {"save_interval": 2}},
           "stages": [{"name": "stage1", "run": {"schedule": {"train_steps": 4}}},
                      {"name": "stage2", "run": {"schedule": {"train_steps": stage2_steps}}},
                      {"name": "stage3", "run": {"optimizer": {"lr": 1e-5},
                                                 "schedule": {"train_steps": 4}}}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _curriculum(job: Path, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnidiff.platform.cli", "curriculum", str(job)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, **popen)


class MlflowServer:
    """``mlflow server`` on a free loopback port, SQLite store and artifacts in ``root``."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self._healthy():
            assert self.proc.poll() is None and time.monotonic() < deadline, "no mlflow server"
            time.sleep(0.5)

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    yield server
    server.stop()


def _stage_runs(client, parent_id: str) -> dict:
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.info.run_name: run for run in runs}


@pytest.mark.slow
def test_curriculum_tracks_a_parent_and_a_child_run_per_stage(tmp_path, server):
    from mlflow.tracking import MlflowClient

    done = _curriculum(_job(tmp_path, server.uri))
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "curriculum.json").read_text())
    client = MlflowClient(server.uri)
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    children = _stage_runs(client, state["parent_run_id"])
    assert sorted(children) == ["tiny-stage1", "tiny-stage2", "tiny-stage3"]
    stage3 = children["tiny-stage3"]
    assert stage3.data.params["optimizer.lr"] == "1e-05"
    assert stage3.data.params["checkpoint.init_from"].endswith("stage2/export")
    assert stage3.info.status == "FINISHED"
    history = client.get_metric_history(stage3.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert client.get_metric_history(stage3.info.run_id, "masked_accuracy")
    assert client.get_metric_history(stage3.info.run_id, "system/rss_gib")
    artifacts = {a.path for a in client.list_artifacts(stage3.info.run_id)}
    assert {"config.yaml", "loss.png", "export.json"} <= artifacts
    for stage in ("stage1", "stage2", "stage3"):
        assert (tmp_path / "out" / stage / "export" / "config.json").is_file()
        assert (tmp_path / "out" / stage / "stage.json").is_file()
    assert "mlflow ui --backend-store-uri" in done.stdout


@pytest.mark.slow
def test_a_dead_tracking_server_does_not_stop_training(tmp_path, server):
    proc = subprocess.Popen([sys.executable, "-m", "omnidiff.platform.cli", "curriculum",
                             str(_job(tmp_path, server.uri, stage2_steps=30))], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while len(read_metrics(tmp_path / "out" / "stage2")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    server.stop()  # in the middle of stage 2
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("is unavailable") == 1, err[-3000:]
    assert (tmp_path / "out" / "stage3" / "stage.json").is_file()
    assert len(read_metrics(tmp_path / "out" / "stage3")) == 4


@pytest.mark.slow
def test_sigkill_in_stage_2_then_rerun_gives_the_uninterrupted_weights(tmp_path):
    from mlflow.tracking import MlflowClient

    full = tmp_path / "full"
    full.mkdir()
    assert _curriculum(_job(full, stage2_steps=12)).returncode == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    job = _job(killed, stage2_steps=12)
    proc = subprocess.Popen([sys.executable, "-m", "omnidiff.platform.cli", "curriculum",
                             str(job)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while len(read_metrics(killed / "out" / "stage2")) < 5:  # a checkpoint at 4, not yet 6
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "out" / "stage2" / "stage.json").exists()

    again = _curriculum(job)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage1     skipped" in again.stdout
    want = load_file(full / "out" / "stage3" / "export" / "model.safetensors")
    got = load_file(killed / "out" / "stage3" / "export" / "model.safetensors")
    assert want.keys() == got.keys()
    assert all((want[k] == got[k]).all() for k in want)  # bit for bit
    state = json.loads((killed / "out" / "curriculum.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    assert sorted(_stage_runs(client, state["parent_run_id"])) == [
        "tiny-stage1", "tiny-stage2", "tiny-stage3"]  # the same runs, continued
