"""``omnidiff train CONFIG [section.key=value ...]``: one run, on one process or many.

With ``parallel.nproc_per_node > 1`` the command starts the worker processes itself (like
torchrun); under an external launcher (torchrun, a Kubernetes job) each process runs the same
command and joins the given rendezvous.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torch.multiprocessing import ProcessExitedException

from omnidiff import RunStopped, UserError
from omnidiff.parallel.dims import ParallelDims
from omnidiff.parallel.launcher import launched_externally, spawn
from omnidiff.platform.commands import CommandError
from omnidiff.platform.config import RunConfig, build_config, load_config

NAME = "train"
HELP = "train a model from a YAML config plus section.key=value overrides"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any config key, e.g. schedule.train_steps=50")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint), 'none', or a checkpoint dir")
    parser.set_defaults(run=run)


def train_worker(raw_config: dict) -> None:
    """Entry point of one training process (importable, for spawn).

    A user error (bad data, a diverged run) ends this process with the error's exit code after
    rank 0 printed its one line; every rank meets the same error, so all of them stop.
    """
    from omnidiff.parallel import topology
    from omnidiff.platform.trainer import Trainer

    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        cfg = build_config(raw_config)
        trainer = Trainer(cfg)
        summary = trainer.run()
        if cfg.checkpoint.export_dir and not summary.stopped_by and summary.checkpoint:
            trainer.dims.any_rank(False)  # every rank's shard is written before rank 0 reads
            if main_rank:
                from omnidiff.platform.hf_export import export_checkpoint

                export_checkpoint(summary.checkpoint, cfg.checkpoint.export_dir, overwrite=True,
                                  progress=cfg.logging.progress_bar)
        if main_rank and summary.stopped_by:
            print(f"stopped by {summary.stopped_by} after step {summary.last_step}; checkpoint "
                  f"{summary.checkpoint}; continue with --resume auto")
        elif main_rank and summary.losses:
            print(f"trained {summary.steps} steps in {summary.seconds:.1f} s: loss "
                  f"{summary.losses[0]:.4f} -> {summary.losses[-1]:.4f}; "
                  f"checkpoint {summary.checkpoint}")
    except UserError as err:
        if main_rank:
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    finally:
        topology.destroy()


def prepare_output_dir(path: Path) -> None:
    """Create the output folder and make sure files can be written there (one line if not)."""
    probe = path / ".omnidiff-write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CommandError(f"output_dir {path}: not a writable folder "
                           f"({err.strerror or err})") from None


def run(args: argparse.Namespace) -> int:
    config_path, overrides = args.config, list(args.overrides)
    if config_path and "=" in config_path and not Path(config_path).exists():
        config_path, overrides = None, [config_path, *overrides]  # only overrides were given
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return launch_training(load_config(config_path, overrides))


def launch_training(cfg: RunConfig) -> int:
    """Run ``cfg`` on its processes (spawned here, or this one under an external launcher);
    the exit code: 0, or a user error's (its line was printed by rank 0)."""
    raw = cfg.model_dump(mode="json")
    nproc = cfg.parallel.nproc_per_node
    if not launched_externally():  # the world is known here: check the layout before starting
        ParallelDims(nproc, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    prepare_output_dir(Path(cfg.output_dir))
    try:
        if nproc > 1 and not launched_externally():
            spawn(train_worker, nproc, raw)
        else:
            train_worker(raw)
    except ProcessExitedException as err:
        if err.exit_code not in (UserError.exit_code, RunStopped.exit_code):
            raise
        return err.exit_code  # the message was printed by rank 0
    except SystemExit as err:
        return int(err.code or 0)
    return 0
