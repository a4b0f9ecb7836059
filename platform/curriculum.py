"""The curriculum runner: a job's stages in order, each from the previous stage's weights.

``run_curriculum(job)`` prepares what the job builds itself (the demo data), then for every stage
not yet complete: composes its run config (the job's keys, the stage's, ``checkpoint.init_from`` =
the previous stage's Hugging Face export, or the job's ``init`` for the first; weights only: a
fresh optimizer and schedule; ``checkpoint.resume=auto``, so a stage killed half-way continues),
trains it like ``omnidiff train``, exports it, logs it to MLflow and marks it complete
(``<stage>/stage.json``). Rerunning the same command skips complete stages and continues the
same MLflow runs: one parent run per job, one child run per stage (ids in
``<output_dir>/curriculum.json``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnidiff.jobs.curriculum import JobConfig, deep_merge
from omnidiff.monitoring.sinks import flatten, read_metrics
from omnidiff.platform.checkpoint import checkpoint_root, complete_checkpoints
from omnidiff.platform.config import RunConfig, build_config

log = logging.getLogger("omnidiff.curriculum")
STAGE_FILE = "stage.json"
STATE_FILE = "curriculum.json"
EXPORT_DIR = "export"


@dataclass
class StageReport:
    name: str
    status: str  # "complete" (this time), "skipped" (before), "stopped", "failed"
    steps: int = 0
    final_loss: float | None = None
    export: str | None = None


@dataclass
class CurriculumReport:
    stages: list[StageReport] = field(default_factory=list)
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    exit_code: int = 0


class Tracking:
    """The job's MLflow runs: created once, their ids kept beside the job's outputs."""

    def __init__(self, job: JobConfig, enabled: bool, uri: str | None, experiment: str) -> None:
        from omnidiff.monitoring.tracking import tracking_uri

        self.path = Path(job.output_dir) / STATE_FILE
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.enabled, self.experiment, self.job = enabled, experiment, job
        self.uri = self.state.get("tracking_uri") or tracking_uri(uri, job.output_dir)

    @property
    def parent(self) -> str | None:
        if not self.enabled:
            return None
        if "parent_run_id" not in self.state:
            from omnidiff.monitoring.tracking import start_run

            run_id = start_run(self.uri, self.experiment, self.job.name, tags={"job": self.job.name})
            if run_id is None:
                self.enabled = False
                return None
            self._save(tracking_uri=self.uri, parent_run_id=run_id)
        return self.state["parent_run_id"]

    def stage_run(self, name: str, params: dict[str, Any]) -> str | None:
        """The stage's child run (created once, with the stage's flattened run config)."""
        runs = self.state.get("stage_runs", {})
        if name in runs or self.parent is None:
            return runs.get(name)
        from omnidiff.monitoring.tracking import MlflowTracker, start_run

        run_id = start_run(self.uri, self.experiment, f"{self.job.name}-{name}", self.parent)
        if run_id is None:
            return None
        tracker = MlflowTracker(self.uri, run_id)
        tracker.log_params(params)
        tracker.close()
        self._save(stage_runs={**runs, name: run_id})
        return run_id

    def _save(self, **values: Any) -> None:
        self.state.update(values)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.state, indent=2))


def stage_config(job: JobConfig, index: int, tracking: Tracking) -> RunConfig:
    """Stage ``index``'s run config, chained to the stage before it."""
    raw = job.stage_run_config(index)
    start = (str(job.stage_dir(index - 1) / EXPORT_DIR) if index
             else job.init.hf if job.init else None)
    checkpoint = {"resume": "auto", "init_from": start,
                  "export_dir": str(job.stage_dir(index) / EXPORT_DIR) if job.export else None}
    if job.init:
        checkpoint["init_new_rows"] = job.init.new_rows
    logging_keys = {"progress_label": job.stages[index].name}
    raw = deep_merge(raw, {"checkpoint": checkpoint, "logging": logging_keys})
    cfg = build_config(raw)
    run_id = tracking.stage_run(job.stages[index].name, flatten(cfg.model_dump(mode="json")))
    if run_id:
        cfg = build_config(deep_merge(raw, {"logging": {
            "mlflow": True, "mlflow_tracking_uri": tracking.uri, "mlflow_run_id": run_id}}))
    return cfg


def _finished(cfg: RunConfig) -> Path | None:
    """The final checkpoint, when the stage trained to its last step."""
    found = complete_checkpoints(checkpoint_root(cfg.output_dir))
    final = f"step_{cfg.schedule.train_steps:08d}"
    return found[-1] if found and found[-1].name == final else None


def _artifacts(cfg: RunConfig, stage_dir: Path, export: Path | None, run_id: str | None,
               tracking: Tracking) -> None:
    from omnidiff.monitoring.plots import loss_curve
    from omnidiff.monitoring.tracking import MlflowTracker

    curve = loss_curve(read_metrics(stage_dir), stage_dir / "loss.png", cfg.name)
    reference = stage_dir / "export.json"
    reference.write_text(json.dumps({"export": str(export.resolve()) if export else None}))
    if run_id is None:
        return
    tracker = MlflowTracker(tracking.uri, run_id)
    for path in (stage_dir / "config.yaml", curve, reference):
        tracker.log_artifact(path)
    tracker.set_terminated("FINISHED")
    tracker.close()


def run_stage(job: JobConfig, index: int, tracking: Tracking) -> StageReport:
    from omnidiff.platform.commands.train import launch_training

    name, stage_dir = job.stages[index].name, job.stage_dir(index)
    cfg = stage_config(job, index, tracking)
    code = launch_training(cfg)
    if code:
        return StageReport(name, "failed")
    final = _finished(cfg)
    rows = read_metrics(stage_dir)
    report = StageReport(name, "stopped" if final is None else "complete",
                         rows[-1]["step"] if rows else 0, rows[-1].get("loss") if rows else None)
    if final is None:
        return report
    export = Path(cfg.checkpoint.export_dir) if cfg.checkpoint.export_dir else None
    report.export = str(export) if export else None
    _artifacts(cfg, stage_dir, export, cfg.logging.mlflow_run_id, tracking)
    (stage_dir / STAGE_FILE).write_text(json.dumps({
        "checkpoint": str(final), "export": report.export, "steps": report.steps,
        "final_loss": report.final_loss}, indent=2))
    return report


def run_curriculum(job: JobConfig, stages: list[int] | None = None) -> CurriculumReport:
    """Every stage (or the given ones, in order) that is not complete yet."""
    from omnidiff.platform.demo_prepare import prepare

    base = build_config(job.stage_run_config(0))  # validates the job's keys before any work
    prepare(job)
    tracking = Tracking(job, enabled=job.run.get("logging", {}).get("mlflow", True),
                        uri=base.logging.mlflow_tracking_uri,
                        experiment=base.logging.mlflow_experiment)
    report = CurriculumReport(tracking_uri=tracking.uri if tracking.enabled else None)
    report.parent_run_id = tracking.parent
    for index in stages if stages is not None else range(len(job.stages)):
        marker = job.stage_dir(index) / STAGE_FILE
        if marker.is_file():
            done = json.loads(marker.read_text())
            report.stages.append(StageReport(job.stages[index].name, "skipped",
                                             done.get("steps", 0), done.get("final_loss"),
                                             done.get("export")))
            continue
        stage = run_stage(job, index, tracking)
        report.stages.append(stage)
        if stage.status != "complete":
            report.exit_code = 0 if stage.status == "stopped" else 3
            break
    all_done = all((job.stage_dir(i) / STAGE_FILE).is_file() for i in range(len(job.stages)))
    if all_done and report.parent_run_id:
        from omnidiff.monitoring.tracking import MlflowTracker

        tracker = MlflowTracker(tracking.uri, report.parent_run_id)
        tracker.set_terminated("FINISHED")
        tracker.close()
    return report
