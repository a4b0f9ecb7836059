"""``omnidiff curriculum JOB``: train a job's stages in order (the demo: ``omnidiff curriculum demo``)."""

from __future__ import annotations

import argparse

NAME = "curriculum"
HELP = ("run a curriculum job (a YAML file, or a built-in: demo, demo-long, omni-diffusion, ...): "
        "stage after stage, each from the previous one's weights; rerun to continue where it stopped")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file, or a built-in job name (jobs/curricula/)")
    parser.add_argument("--stage", type=int, action="append", metavar="N",
                        help="run only stage N (1-based; repeatable); default: all, in order")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.jobs.curriculum import load_job
    from omnidiff.platform.commands import CommandError
    from omnidiff.platform.curriculum import run_curriculum

    job = load_job(args.job)
    stages = None
    if args.stage:
        bad = [n for n in args.stage if not 1 <= n <= len(job.stages)]
        if bad:
            raise CommandError(f"--stage {bad[0]}: the job has stages 1..{len(job.stages)}")
        stages = sorted(n - 1 for n in set(args.stage))
    report = run_curriculum(job, stages)
    print(f"\ncurriculum {job.name}:")
    for stage in report.stages:
        loss = f"{stage.final_loss:.4f}" if stage.final_loss is not None else "-"
        print(f"  {stage.name:10s} {stage.status:9s} {stage.steps:6d} steps  final loss {loss}"
              f"  export {stage.export or '-'}")
    if report.parent_run_id:
        print(f"MLflow run {report.parent_run_id} at {report.tracking_uri}; to look at it:\n"
              f"  mlflow ui --backend-store-uri {report.tracking_uri}")
    if any(stage.status == "stopped" for stage in report.stages):
        print("stopped before the end: run the same command again to continue")
    return report.exit_code
