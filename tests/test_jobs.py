"""Curriculum job files: every built-in one loads and builds its stage configs; ``extends``."""

from __future__ import annotations

import pytest
import yaml

from omnidiff import ConfigError
from omnidiff.jobs.curriculum import JOBS_DIR, load_job
from omnidiff.platform.config import build_config


@pytest.mark.parametrize("name", sorted(p.stem for p in JOBS_DIR.glob("*.yaml")))
def test_every_built_in_job_builds_the_run_config_of_each_stage(name):
    job = load_job(name)
    for index in range(len(job.stages)):
        cfg = build_config(job.stage_run_config(index))
        assert cfg.output_dir.endswith(job.stages[index].name)


def test_demo_long_is_the_demo_three_times_as_long():
    demo, long = load_job("demo"), load_job("demo-long")
    assert [s.name for s in long.stages] == [s.name for s in demo.stages]
    for index in range(len(demo.stages)):
        short, longer = (build_config(j.stage_run_config(index)) for j in (demo, long))
        assert longer.schedule.train_steps == 3 * short.schedule.train_steps
        assert longer.optimizer.lr == short.optimizer.lr and longer.data == short.data
    assert long.prepare == demo.prepare  # the same data, built once
    assert long.output_dir == "runs/demo-long"


def _write(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


def test_extends_merges_keys_and_stages_by_name(tmp_path):
    _write(tmp_path / "base.yaml", {
        "name": "base", "output_dir": "runs/base", "run": {"optimizer": {"lr": 1e-3, "beta2": 0.95}},
        "stages": [{"name": "one", "run": {"schedule": {"train_steps": 10}, "seed": 3}},
                   {"name": "two", "run": {"schedule": {"train_steps": 20}}}]})
    child = _write(tmp_path / "child.yaml", {
        "extends": "base.yaml", "name": "child", "run": {"optimizer": {"lr": 5e-4}},
        "stages": [{"name": "two", "run": {"schedule": {"train_steps": 40}}},
                   {"name": "three", "run": {"seed": 9}}]})
    job = load_job(child)
    assert job.name == "child" and job.output_dir == "runs/base"
    assert job.run == {"optimizer": {"lr": 5e-4, "beta2": 0.95}}
    assert [(s.name, s.run) for s in job.stages] == [
        ("one", {"schedule": {"train_steps": 10}, "seed": 3}),
        ("two", {"schedule": {"train_steps": 40}}), ("three", {"seed": 9})]


def test_extends_that_leads_back_or_nowhere_is_one_line(tmp_path):
    _write(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml", "name": "b"})
    with pytest.raises(ConfigError, match=r"b.yaml: extends: a.yaml leads back to this job"):
        load_job(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", {"extends": "no-such-job", "name": "c"})
    with pytest.raises(ConfigError, match="job no-such-job: no such file"):
        load_job(tmp_path / "c.yaml")
    _write(tmp_path / "d.yaml", {"extends": ["demo"], "name": "d"})
    with pytest.raises(ConfigError, match="d.yaml: extends: a job file or a built-in job name"):
        load_job(tmp_path / "d.yaml")
