"""Crash and resume through the real ``omnidiff train`` command (2 processes, DP=2, ZeRO-2).

One run is SIGKILLed (the whole process group, as a lost node) while it is writing the step-4
checkpoint, after the step-2 one completed: ``--resume auto`` must pick step 2, ignore the
half-written save and reproduce the uninterrupted run's losses exactly; the metrics the killed
run logged after step 2 are replaced, not repeated. A diverging run must
stop with one clear message, exit code 3, and leave only a checkpoint of good weights. The same
command under torchrun (an external launcher) must give the self-launched run's losses.
"""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omnidiff.monitoring.metrics import read_metrics
from omnidiff.platform.checkpoint import META, checkpoint_root, complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "harness" / "faults"
RUN = ("model.num_layers=2", "data.seq_length=64", "data.image_codebook_size=64",
       "data.speech_codebook_size=64", "data.micro_batch_size=1", "data.global_batch_size=4",
       "schedule.train_steps=6", "checkpoint.save_interval=2", "logging.log_interval=1",
       "logging.progress_bar=false", "parallel.nproc_per_node=2", "parallel.zero_stage=2")


def _command(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "omnidiff.platform.cli", "train", f"output_dir={output_dir}",
            *RUN, *extra]


def _train(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(output_dir, *extra), cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def _names(output_dir: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(checkpoint_root(output_dir))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[float]:
    """Losses of the 6-step run launched by the command itself."""
    full = tmp_path_factory.mktemp("full")
    done = _train(full)
    assert done.returncode == 0, done.stderr[-2000:]
    return [r["loss"] for r in read_metrics(full)]


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint_exactly(tmp_path,
                                                                             uninterrupted):
    killed = tmp_path / "killed"

    partial = checkpoint_root(killed) / ".tmp_step_00000004"
    with (tmp_path / "killed.log").open("w") as log:
        env = {**os.environ, "OMNIDIFF_FAULT_STALL_SAVE": "4",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS),
                                                           os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(_command(killed), cwd=REPO, env=env,
                                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 300
        while not (partial / "rank00000.pt").exists():  # rank 0 wrote, rank 1 hangs
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the stalled save never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _names(killed) == ["step_00000002"]
    assert not (partial / META).exists() and not (partial / "rank00001.pt").exists()

    resumed = _train(killed, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = read_metrics(killed)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the killed run's 3-4 replaced
    assert [r["loss"] for r in rows] == uninterrupted  # exactly, not approximately
    assert _names(killed) == ["step_00000004", "step_00000006"]


@pytest.mark.slow
def test_diverging_run_stops_with_one_message_and_keeps_a_good_checkpoint(tmp_path):
    # lr 1e30: step 1 is applied (finite, huge weights), every later loss is non-finite.
    result = _train(tmp_path, "optimizer.lr=1e30", "schedule.warmup_fraction=0",
                    "checkpoint.save_interval=1", "schedule.train_steps=10")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "error: 5 optimizer steps in a row had a non-finite loss" in result.stderr
    assert "Traceback" not in result.stderr
    assert [r["skipped_steps"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    assert _names(tmp_path) == ["step_00000001"]  # skipped steps never save
    for shard in (checkpoint_root(tmp_path) / "step_00000001").glob("rank*.pt"):
        weights = torch.load(shard, weights_only=True)["engine"]["model"]
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()
                   if isinstance(t, torch.Tensor)), shard
    assert not math.isnan(read_metrics(tmp_path)[0]["loss"])


@pytest.mark.slow
def test_torchrun_runs_the_same_command_unchanged(tmp_path, uninterrupted):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "omnidiff.platform.cli", "train",
                f"output_dir={tmp_path}", *RUN]
    done = subprocess.run(torchrun, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["loss"] for r in read_metrics(tmp_path)] == uninterrupted
