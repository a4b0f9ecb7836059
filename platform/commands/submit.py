"""``omnidiff submit JOB --stage N|all``: run a curriculum job's stages on Kubernetes.

``--dry-run`` prints the manifests (or writes ``kubectl apply -k`` directories to ``--out``);
otherwise they are applied through the Kubernetes API, and ``--stage all`` submits each stage
once the previous one succeeded. The logic lives in ``k8s/`` (render, submit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omnidiff.k8s.config import KINDS
from omnidiff.platform.commands import CommandError

NAME = "submit"
HELP = "run a curriculum job's stages on a Kubernetes cluster, or print / write its manifests"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file, or a built-in job name (jobs/curricula/)")
    parser.add_argument("--stage", required=True,
                        help="a stage number (1-based) or name, or all: every stage, each "
                             "submitted once the previous one succeeded")
    parser.add_argument("--kind", choices=KINDS, default=None,
                        help="workload kind (default: the job's cluster.kind, or trainjob)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the manifests instead of applying them")
    parser.add_argument("--out", type=Path, default=None,
                        help="with --dry-run: write one kustomize directory per stage here")
    parser.add_argument("--validate", action="store_true",
                        help="with --dry-run: validate every object offline first (needs the "
                             "test extra: kubernetes-validate)")
    parser.add_argument("--poll", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between state checks while a stage runs (default 30)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.jobs.curriculum import load_job
    from omnidiff.k8s import render
    from omnidiff.k8s.plan import select

    if (args.out or args.validate) and not args.dry_run:
        raise CommandError("--out and --validate go with --dry-run")
    rendered = render.render_job(load_job(args.job), args.kind)
    plans = select(rendered.plans, args.stage)
    if args.dry_run:
        return _dry_run(rendered, plans, args)
    from omnidiff.k8s.submit import connect, run_stages

    run_stages(connect(), rendered, plans, chain=args.stage == "all",
               poll_seconds=args.poll, echo=lambda line: print(line, flush=True))
    return 0


def _dry_run(rendered, plans, args: argparse.Namespace) -> int:
    from omnidiff.k8s import render

    objects = [*rendered.services, *(o for p in plans for o in rendered.stages[p.stage])]
    if args.validate:
        from omnidiff.k8s.validate import validate

        for obj in objects:
            validate(obj)
    if args.out is None:
        print(render.dump(objects), end="")
        return 0
    for path in render.write_tree(render.output_tree(rendered, plans), args.out):
        print(path)
    return 0
