"""``omnidiff import HF_DIR OUT``: a Hugging Face folder (Dream, stock Qwen2 or an omnidiff
export) as a platform export plus a checkpoint for a layout.

Writes ``OUT/export`` (the platform's HF layout, vocabulary resized to the run's multimodal
vocabulary), ``OUT/config.yaml`` and, unless ``--no-checkpoint``, ``OUT/checkpoints/
step_00000000`` for ``--tp x --pp x --dp`` processes and ``--zero`` (engines built in spawned
workers; weights and a fresh optimizer, for ``omnidiff export`` / ``sample``; a training run
starts from the import with ``checkpoint.init_from=OUT/export``). Without ``--config`` the
model shape is the folder's; ``data.text_tokenizer`` says which rows are text (``byte`` by
default: point it at the folder's tokenizer with ``--set data.text_tokenizer=DIR`` to keep a
Qwen2 / Dream text vocabulary).
"""

from __future__ import annotations

import argparse

from omnidiff import read_yaml_mapping

NAME = "import"
HELP = "a Hugging Face folder (Dream / Qwen2 format) as a platform export + checkpoint"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face model folder (config.json + weights)")
    parser.add_argument("out", help="output folder (must be empty)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the checkpoint")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage")
    parser.add_argument("--new-rows", default="normal", choices=("normal", "mean"),
                        help="new vocabulary rows: normal(0, model.init_std) or the mean row")
    parser.add_argument("--config", help="run config YAML (model, data vocabulary, seed)")
    parser.add_argument("--set", action="append", default=[], metavar="section.key=value",
                        help="override a run-config key, e.g. data.text_tokenizer=DIR")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="write only the export and config.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omnidiff.platform.config import apply_overrides, build_config
    from omnidiff.platform.hf_import import import_folder, model_section_from_hf

    raw = apply_overrides(read_yaml_mapping(args.config) if args.config else {}, args.set)
    if "model" not in raw:
        raw["model"] = model_section_from_hf(args.hf_dir)
    world = args.tp * args.pp * args.dp
    raw["parallel"] = {**raw.get("parallel", {}), "tensor_parallel": args.tp,
                       "pipeline_parallel": args.pp, "zero_stage": args.zero,
                       "nproc_per_node": world}
    raw["output_dir"] = args.out
    cfg = build_config(raw)
    out = import_folder(args.hf_dir, args.out, cfg, new_rows=args.new_rows,
                        checkpoint_layout=not args.no_checkpoint, overwrite=args.overwrite,
                        progress=not args.quiet)
    layout = "" if args.no_checkpoint else (
        f" and a checkpoint for TP {args.tp} x PP {args.pp} x DP {args.dp}, ZeRO {args.zero}")
    print(f"imported {args.hf_dir} -> {out}: export{layout}; train from it with "
          f"checkpoint.init_from={out / 'export'}")
    return 0
