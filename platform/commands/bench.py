"""``omnidiff bench [SWEEP] [--set field=value ...]``: time a benchmark sweep on this machine.

Sweeps are defined in ``jobs/benchmarks/sweeps.py`` (``--list`` shows them); ``--set`` changes a
field of every point (``--set preset=tiny --set seq_length=256``). Results go to ``--out``:
``results.json``, ``results.md``, ``results.png`` and a local MLflow store (``mlflow.db``).
The ``released-recipe`` sweep also prints the side-by-side ratios.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omnidiff.platform.commands import CommandError
from omnidiff.platform.config import apply_overrides

NAME = "bench"
HELP = "time training throughput, MFU and peak memory over a benchmark sweep"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", nargs="?", default="precision", help="sweep name (--list)")
    parser.add_argument("--list", action="store_true", help="list the sweeps and exit")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of every point (BenchPoint in jobs/benchmarks/"
                             "sweeps.py), e.g. preset=tiny, seq_length=512, layout=[1,1,2]")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per point, interleaved over the points")
    parser.add_argument("--out", default=None, help="output folder (default runs/bench/SWEEP)")
    parser.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging")
    parser.set_defaults(run=run)


def parse_changes(items: list[str]) -> dict:
    """``field=value`` strings (values parsed as YAML, as run-config overrides; lists become
    tuples) -> dict."""
    changes = apply_overrides({}, items)
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in changes.items()}


def run(args: argparse.Namespace) -> int:
    # imported here: the CLI imports every command module at start, and these pull in the
    # training stack (megatron-core, DeepSpeed)
    from omnidiff.jobs.benchmarks.bench_released_recipe import side_by_side_summary
    from omnidiff.jobs.benchmarks.sweeps import SWEEPS, sweep_points
    from omnidiff.platform.bench import markdown_table, run_sweep, write_reports

    if args.list:
        for name, sweep in SWEEPS.items():
            print(f"{name:<16} {sweep.description}")
        return 0
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        raise CommandError("--steps and --repeats must be >= 1, --warmup >= 0")
    points = sweep_points(args.sweep, **parse_changes(args.set))
    result = run_sweep(points, args.warmup, args.steps, args.repeats)
    out = Path(args.out or f"runs/bench/{args.sweep}")
    for warning in write_reports(result, out, args.sweep, mlflow=not args.no_mlflow):
        print(f"warning: {warning}")
    print(markdown_table(result))
    if args.sweep == "released-recipe":
        print(side_by_side_summary(result["runs"]))
    print(f"results in {out}/")
    return 0
