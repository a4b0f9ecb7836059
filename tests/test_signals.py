"""Shutdown through the real ``omnidiff train`` command: SIGTERM saves and resumes exactly, no
worker outlives its launcher, a dead worker takes the others down.

SIGTERM is what Kubernetes and Slurm send before killing a pod: the run finishes its step, saves
a checkpoint, says so in one line and exits 0; ``--resume auto`` then gives the uninterrupted
run's losses bit for bit (one process, and TP = 2 under the launcher).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from omnidiff.monitoring.sinks import read_metrics
from omnidiff.platform.checkpoint import checkpoint_root, complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
RUN = ("model.num_layers=2", "data.seq_length=64", "data.image_codebook_size=64",
       "data.speech_codebook_size=64", "data.micro_batch_size=1", "data.global_batch_size=2",
       f"schedule.train_steps={STEPS}", "logging.log_interval=1", "logging.progress_bar=false")
TP2 = ("parallel.nproc_per_node=2", "parallel.tensor_parallel=2", "parallel.zero_stage=1")


def _command(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "omnidiff.platform.cli", "train", f"output_dir={output_dir}",
            *RUN, *extra]


def _start(output_dir: Path, *extra: str, rows: int = 5) -> subprocess.Popen:
    """Start a run and return once it has logged ``rows`` steps."""
    proc = subprocess.Popen(_command(output_dir, *extra), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(read_metrics(output_dir)) < rows:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never started training"
        time.sleep(0.05)
    return proc


def _losses(output_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(), TP2], ids=["one-process", "tp2-launcher"])
def test_sigterm_saves_and_resumes_bitwise(tmp_path, layout):
    reference = subprocess.run(_command(tmp_path / "full", *layout), cwd=REPO,
                               capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "stopped"
    proc = _start(run, *layout)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = read_metrics(run)[-1]["step"]
    assert f"stopped by SIGTERM after step {stopped_at}" in out
    assert "Traceback" not in err
    assert stopped_at < STEPS
    assert [p.name for p in complete_checkpoints(checkpoint_root(run))] == [
        f"step_{stopped_at:08d}"]

    resumed = subprocess.run(_command(run, *layout, "--resume", "auto"), cwd=REPO,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["step"] for row in read_metrics(run)] == list(range(1, STEPS + 1))
    assert _losses(run) == _losses(tmp_path / "full")  # bit for bit


def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [child for child in psutil.Process(launcher.pid).children(recursive=True)
            if "resource_tracker" not in " ".join(child.cmdline())]


def _gone(processes: list[psutil.Process], timeout: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


@pytest.mark.slow
def test_no_worker_outlives_a_killed_launcher(tmp_path):
    launcher = _start(tmp_path / "a", *TP2)
    workers = _workers(launcher)
    assert len(workers) >= 2
    os.kill(launcher.pid, signal.SIGKILL)  # no chance to forward anything
    launcher.wait()
    assert _gone(workers, timeout=60), [w.pid for w in workers if w.is_running()]


@pytest.mark.slow
def test_a_dead_worker_takes_the_others_down_within_seconds(tmp_path):
    launcher = _start(tmp_path / "b", *TP2)
    workers = _workers(launcher)
    os.kill(workers[-1].pid, signal.SIGKILL)
    began = time.monotonic()
    launcher.wait(timeout=120)
    assert launcher.returncode != 0
    assert _gone(workers, timeout=30)
    assert time.monotonic() - began < 30
