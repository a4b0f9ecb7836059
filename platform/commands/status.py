"""``omnidiff status JOB``: each curriculum stage's state on the cluster."""

from __future__ import annotations

import argparse

from omnidiff.k8s.config import KINDS

NAME = "status"
HELP = "show each stage of a curriculum job on the cluster: not submitted, running, succeeded, ..."


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file, or a built-in job name (jobs/curricula/)")
    parser.add_argument("--kind", choices=KINDS, default=None,
                        help="workload kind the stages were submitted as (default: the job's)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.jobs.curriculum import load_job
    from omnidiff.k8s.render import render_job
    from omnidiff.k8s.submit import connect, stage_states

    rendered = render_job(load_job(args.job), args.kind)
    rows = stage_states(connect(), rendered)
    width = max(len(plan.name) for plan, _, _ in rows)
    for plan, state, message in rows:
        print(f"{plan.index + 1}  {plan.stage:<10} {plan.name:<{width}}  {state}"
              + (f"  ({message})" if message else ""))
    return 0
