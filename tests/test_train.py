"""The train command end to end on the tiny preset, and the learning-rate schedule."""

import subprocess
import sys
from pathlib import Path

import pytest

from omnidiff.monitoring.metrics import read_metrics
from omnidiff.platform.config import ScheduleConfig
from omnidiff.parallel.optim import lr_multiplier

REPO = Path(__file__).resolve().parents[1]


def test_schedule_warmup_then_cosine_to_min_ratio():
    schedule = ScheduleConfig(train_steps=100, warmup_fraction=0.1, min_lr_ratio=0.1)
    assert lr_multiplier(0, schedule) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule) == pytest.approx(1.0)
    assert lr_multiplier(10, schedule) == pytest.approx(1.0)
    assert lr_multiplier(55, schedule) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_multiplier(100, schedule) == pytest.approx(0.1)


def test_tiny_training_run_halves_the_loss(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "omnidiff.platform.cli", "train", "jobs/configs/tiny.yaml",
         f"output_dir={tmp_path}", "schedule.train_steps=60", "logging.log_interval=1",
         "logging.progress_bar=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [row["loss"] for row in read_metrics(tmp_path)]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 <= losses[0] / 2, losses
    assert (tmp_path / "checkpoints" / "step_00000060" / "meta.json").is_file()
    assert (tmp_path / "config.yaml").is_file()


def test_a_run_starts_quietly_and_debug_shows_what_was_hidden(tmp_path):
    """No start-up warning a user cannot act on reaches the terminal: data parallel with ZeRO-1,
    where megatron-core, DeepSpeed and torch.distributed each printed some in every worker;
    ``--debug`` shows them again (the filters are by message, not all warnings)."""
    command = [sys.executable, "-m", "omnidiff.platform.cli"]
    run = ["train", "jobs/configs/tiny.yaml", "schedule.train_steps=2", "logging.progress_bar=false"]
    quiet = subprocess.run(
        command + run + ["parallel.nproc_per_node=2", "parallel.zero_stage=1",
                         f"output_dir={tmp_path / 'quiet'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == ""
    debug = subprocess.run(command + ["--debug"] + run + [f"output_dir={tmp_path / 'debug'}"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert debug.returncode == 0, debug.stderr[-2000:]
    assert "UserWarning: Transformer Engine and Apex are not installed" in debug.stderr
