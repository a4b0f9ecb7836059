"""Hugging Face weights (Dream, stock Qwen2 or an omnidiff export) into the platform.

:func:`megatron_weights_from_hf` is the whole conversion: the folder's ``config.json`` is checked
against the run's ``model`` section (RoPE base from ``rope_parameters`` or the top level), the
weights are read (safetensors, or ``.bin`` with ``torch.load(weights_only=True)``), the
vocabulary is resized to the run's multimodal layout and the names become megatron's (TP = 1).
Text rows keep their ids; the rows the folder lacks - the multimodal tokens, and any chat special
its tokenizer lacked - start as ``normal`` (N(0, model.init_std), from ``seed``) or as the
``mean`` of the kept rows. A folder written by ``omnidiff export`` (``real_vocab_size`` in its
config) keeps all its rows.

:func:`import_folder` (``omnidiff import``) writes that as a platform HF export and, for a given
layout, a step-0 platform checkpoint: the engine is built in spawned workers from those weights
(``build_engine``'s ``initial_weights``, as ``checkpoint.init_from`` does) and saved through
:mod:`omnidiff.platform.checkpoint`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from omnidiff import UserError
from omnidiff.data.tokens.text import build_vocab
from omnidiff.k8s.plan import EXPORT_DIR
from omnidiff.parallel import topology
from omnidiff.parallel.engines import build_engine
from omnidiff.parallel.launcher import spawn
from omnidiff.platform import checkpoint
from omnidiff.platform.config import ModelConfig, RunConfig, build_config, dump_config
from omnidiff.platform.hf_convert import HF_MODEL_KEYS, hf_to_megatron, model_fields_from_hf
from omnidiff.platform.hf_export import VOCAB_FILE, check_target, write_hf_folder
from omnidiff.platform.objective import DiffusionObjective

Tensor = torch.Tensor
NEW_ROWS = ("normal", "mean")
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
# The weight files a folder may have, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


class HFImportError(UserError):
    """A Hugging Face folder that does not fit the run (missing files, other shapes)."""


def megatron_weights_from_hf(hf_dir: str | Path, model_cfg: ModelConfig, vocab_rows: int,
                             text_rows_expected: int | None, new_rows: str,
                             seed: int) -> dict[str, Tensor]:
    """Full TP = 1 megatron-named fp32 weights of ``hf_dir``, vocabulary resized to
    ``vocab_rows`` embedding rows (the run's padded vocabulary).

    ``text_rows_expected`` (the run vocabulary's ``text_size``) is how many leading rows are
    text and kept; None keeps every row of the folder. ``new_rows``: ``normal`` or ``mean``.
    """
    hf_dir = Path(hf_dir)
    if new_rows not in NEW_ROWS:
        raise HFImportError(f"new_rows {new_rows!r}: one of {', '.join(NEW_ROWS)}")
    config = read_hf_config(hf_dir)
    check_model_fits(config, model_cfg, hf_dir)
    weights = {k: v for k, v in load_hf_weights(hf_dir).items()
               if not k.endswith("rotary_emb.inv_freq")}  # a buffer older Qwen2 files kept
    if "lm_head.weight" not in weights and config.get("tie_word_embeddings"):
        weights["lm_head.weight"] = weights.get("model.embed_tokens.weight")
    for key in VOCAB_KEYS:
        if weights.get(key) is None:
            raise HFImportError(f"{hf_dir}: no {key!r} in the weights")
    keep = _kept_rows(hf_dir, config, weights[VOCAB_KEYS[0]].shape[0], vocab_rows,
                      text_rows_expected)
    generator = torch.Generator().manual_seed(seed)
    weights = {k: v.float() for k, v in weights.items()}
    for key in VOCAB_KEYS:
        weights[key] = resize_rows(weights[key], keep, vocab_rows, new_rows,
                                   model_cfg.init_std, generator)
    try:
        return hf_to_megatron(weights, model_cfg)
    except (KeyError, ValueError) as err:
        raise HFImportError(f"{hf_dir}: {err.args[0] if err.args else err}") from None


def resize_rows(table: Tensor, keep: int, rows: int, new_rows: str, std: float,
                generator: torch.Generator) -> Tensor:
    """``table[:keep]`` followed by ``rows - keep`` new rows (normal(0, std) or their mean)."""
    kept = table[:keep]
    count = rows - keep
    if new_rows == "mean":
        fresh = kept.mean(dim=0, keepdim=True).expand(count, -1)
    else:
        fresh = torch.randn(count, table.shape[1], generator=generator) * std
    return torch.cat([kept, fresh.to(kept.dtype)]).contiguous()


def _kept_rows(hf_dir: Path, config: Mapping[str, Any], have: int, rows: int,
               text_rows: int | None) -> int:
    """How many leading rows of the folder's vocabulary tables the run keeps."""
    real = config.get("real_vocab_size")
    layout = hf_dir / VOCAB_FILE
    if real is not None and text_rows is not None and layout.is_file():
        theirs = json.loads(layout.read_text()).get("text_size")
        if theirs != text_rows:
            raise HFImportError(f"{layout}: text_size {theirs}, the run's text tokenizer has "
                                f"{text_rows} entries (data.text_tokenizer)")
    wanted = real if real is not None else (have if text_rows is None else min(have, text_rows))
    if wanted > rows:
        raise HFImportError(f"{hf_dir}: {wanted} token rows, the run's vocabulary has {rows} "
                            "embedding rows (data.text_tokenizer, codebook sizes)")
    return min(have, rows) if real is not None else wanted


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFImportError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HFImportError(f"{path}: unreadable ({err})") from None
    if not isinstance(config, dict):
        raise HFImportError(f"{path}: not a JSON object")
    return config


def model_section_from_hf(hf_dir: str | Path) -> dict[str, Any]:
    """A run config ``model`` section with the folder's shape (preset ``custom``)."""
    hf_dir = Path(hf_dir)
    try:
        return {"preset": "custom", **model_fields_from_hf(read_hf_config(hf_dir))}
    except (KeyError, ValueError) as err:
        raise HFImportError(f"{hf_dir}/config.json: {err.args[0]}") from None


def check_model_fits(config: Mapping[str, Any], model_cfg: ModelConfig, hf_dir: Path) -> None:
    """One line naming the first HF key whose value the run's ``model`` section contradicts."""
    where = hf_dir / "config.json"
    try:
        fields = model_fields_from_hf(config)
    except (KeyError, ValueError) as err:
        raise HFImportError(f"{where}: {err.args[0]}") from None
    for theirs, ours in (*HF_MODEL_KEYS, ("rope_theta", "rope_theta")):
        if not math.isclose(fields[ours], getattr(model_cfg, ours), rel_tol=1e-9):
            raise HFImportError(f"{where}: {theirs} is {fields[ours]}, the run config has "
                                f"model.{ours} = {getattr(model_cfg, ours)}")
    if config.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"{where}: hidden_act {config['hidden_act']!r} (the model uses silu)")
    if config.get("use_sliding_window"):
        raise HFImportError(f"{where}: use_sliding_window (the model attends to every token)")


def load_hf_weights(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of the folder; ``.bin`` files load without running pickled code."""
    found = next((hf_dir / name for name in WEIGHT_FILES if (hf_dir / name).is_file()), None)
    if found is None:
        raise HFImportError(f"{hf_dir}: no weights ({', '.join(WEIGHT_FILES)})")
    files = [found]
    if found.name.endswith(".index.json"):
        try:
            weight_map = json.loads(found.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HFImportError(f"{found}: unreadable index ({err})") from None
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    weights: dict[str, Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(file) if file.suffix == ".safetensors"
                           else torch.load(file, map_location="cpu", weights_only=True))
        except Exception as err:  # noqa: BLE001 - any unreadable weight file is one line
            raise HFImportError(f"{file}: unreadable weights "
                                f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                                ) from None
    return weights


# --- omnidiff import: an export + a checkpoint for a layout ------------------------------------
def import_folder(hf_dir: str | Path, out_dir: str | Path, cfg: RunConfig, *,
                  new_rows: str = "normal", checkpoint_layout: bool = True,
                  overwrite: bool = False, progress: bool = True) -> Path:
    """``out_dir/export`` (the folder in the platform's layout, vocabulary resized),
    ``out_dir/config.yaml`` and, with ``checkpoint_layout``, ``out_dir/checkpoints/
    step_00000000`` for ``cfg.parallel`` on ``parallel.nproc_per_node`` spawned processes."""
    out = Path(out_dir)
    check_target(out, overwrite)
    vocab, _ = build_vocab(cfg.data)
    rows = vocab.padded_size(cfg.parallel.tensor_parallel)
    weights = megatron_weights_from_hf(hf_dir, cfg.model, rows, vocab.text_size, new_rows,
                                       cfg.seed)
    if out.exists():  # check_target let it through: empty, or --overwrite
        shutil.rmtree(out)
    export = write_hf_folder(cfg, weights, out / EXPORT_DIR, progress=progress)
    (out / "config.yaml").write_text(dump_config(cfg))
    if checkpoint_layout:
        spawn(checkpoint_worker, cfg.parallel.nproc_per_node, cfg.model_dump(mode="json"),
              str(export), str(out))
    return out


def checkpoint_worker(raw_config: dict, export_dir: str, out_dir: str) -> None:
    """One spawned rank of :func:`import_folder`."""
    try:
        write_layout_checkpoint(build_config(raw_config), export_dir, out_dir)
    finally:
        topology.destroy()


def write_layout_checkpoint(cfg: RunConfig, export_dir: str | Path, out_dir: str | Path) -> Path:
    """Collectively (every rank of ``cfg``'s layout): build the engine, load the weights of an
    omnidiff HF export into it and save them as step 0 of ``out_dir``."""
    dims = topology.initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    vocab, _ = build_vocab(cfg.data)
    rows = vocab.padded_size(cfg.parallel.tensor_parallel)
    full = megatron_weights_from_hf(export_dir, cfg.model, rows, vocab.text_size, "normal",
                                    cfg.seed)
    engine = build_engine(cfg, dims, rows, DiffusionObjective(cfg.diffusion), full)
    return checkpoint.save(out_dir, 0, {"engine": engine.state_dict(), "step": 0},
                           cfg.checkpoint.keep_last, meta={"config": cfg.model_dump(mode="json")})
