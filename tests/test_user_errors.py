"""Every failure a user can cause is one line naming the key or path, exit code 2 (config or
input) or 3 (run stopped); metrics stay valid JSON and a resume does not repeat them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from omnidiff.monitoring.sinks import JsonlSink, read_metrics

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnidiff.platform.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and "Warning" not in line and "warnings.warn" not in line
             and not line.startswith("[")]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("args, needle", [
    (["train", "parallel.tensor_parallel=2", "schedule.train_steps=1"],
     "world size 1 is not a multiple of parallel.tensor_parallel"),
    (["train", "model.preset=huge"], "unknown model.preset 'huge'"),
    (["train", "model.num_layers=-1"], "model.num_layers"),
])
def test_bad_settings_are_one_line(tmp_path, args, needle):
    result = _cli(*args, f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert needle in _one_error_line(result)


def test_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  preset: [tiny\nschedule: 1\n")
    result = _cli("train", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "not valid YAML" in _one_error_line(result) and "line 3" in result.stderr


def test_unwritable_output_dir_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = _cli("train", f"output_dir={tmp_path / 'a-file' / 'run'}", "schedule.train_steps=1",
                  cwd=tmp_path)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "output_dir" in line and "not a writable folder" in line


def test_metrics_are_strict_json_and_a_resume_replaces_the_tail(tmp_path):
    sink = JsonlSink(tmp_path)
    for step, loss in ((1, 2.0), (2, float("nan")), (3, float("inf")), (4, 1.0)):
        sink.log(step, {"loss": loss})
    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON {name}"))
    rows = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [2.0, None, None, 1.0]

    resumed = JsonlSink(tmp_path, start_step=2)  # resumed from the step-2 checkpoint
    resumed.log(3, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 2.0), (2, None),
                                                                      (3, 0.5)]
    assert not math.isnan(read_metrics(tmp_path)[0]["loss"])


def test_too_small_text_vocabulary_is_refused_before_any_fitting(tmp_path):
    """The BPE size check sits with the fitter (MIN_TEXT_VOCAB) and is read by both ways in:
    a job's prepare section and ``fit-tokenizers --text-vocab``, each before the slow work."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "j", "output_dir": str(tmp_path / "out"),
        "prepare": {"demo_data": str(tmp_path / "data"), "tokenizers": str(tmp_path / "tok"),
                    "text_vocab": 100},
        "stages": [{"name": "s1"}]}))
    result = _cli("curriculum", str(job), cwd=tmp_path)
    assert result.returncode == 2
    assert "prepare.text_vocab" in _one_error_line(result) and "300" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing was built
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(yaml.safe_dump({"sources": {"a": {"shards": ["a-000000.tar"]}},
                                       "stages": {"s": {"a": 1.0}}}))
    result = _cli("fit-tokenizers", str(mixture), "--out", str(tmp_path / "tok"),
                  "--text-vocab", "100", cwd=tmp_path)
    assert result.returncode == 2
    assert "--text-vocab 100" in _one_error_line(result)
    assert not (tmp_path / "tok").exists()
