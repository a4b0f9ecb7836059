"""Read a local weight checkpoint and load it into a module by key, strictly, with a one-line error.

Pretrained media tokenizers are published as safetensors or torch pickles, sometimes sharded,
sometimes wrapped in ``{"state_dict": ...}``; this module accepts all of these from a file or a
directory, and reports every missing, unexpected or mis-shaped key instead of loading silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnidiff import UserError

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "module")
_SHOWN = 8


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's keys or shapes do not match the module it is loaded into."""


def weight_files(path: Path) -> list[Path]:
    """The weight file(s) of a file or directory: every ``*.safetensors`` (shards), else torch files."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight file (*.safetensors, *{', *'.join(TORCH_SUFFIXES)}) in {path}")
    return files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint at ``path`` (file or directory), on CPU."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(Path(path)):
        if file.suffix == ".safetensors":
            state.update(load_file(str(file), device="cpu"))
        else:
            state.update(_unwrap(torch.load(file, map_location="cpu", weights_only=True), file))
    return state


def _unwrap(obj: object, file: Path) -> dict[str, torch.Tensor]:
    """Torch checkpoints often nest the weights under one wrapper key next to training metadata."""
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], file)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointMismatchError(f"{file} holds no tensor state dict")


def load_by_key(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    what: str,
    strip_prefixes: Iterable[str] = (),
    drop: Callable[[str], bool] = lambda key: False,
) -> None:
    """Load ``state`` into ``module`` strictly by key.

    ``strip_prefixes`` are removed from checkpoint keys (alternative layouts of the same weights);
    keys for which ``drop(key)`` is true are skipped (training-only buffers, layers past the part
    this module implements). Anything else that differs raises
    :class:`CheckpointMismatchError` naming the keys.
    """
    prefixes = tuple(strip_prefixes)
    cleaned: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if not drop(key):
            cleaned[key] = tensor
    expected = module.state_dict()
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    shapes = sorted(
        f"{k} {tuple(cleaned[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(cleaned)
        if cleaned[k].shape != expected[k].shape
    )
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_SHOWN])}{' ...' if len(items) > _SHOWN else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise CheckpointMismatchError(f"{what} checkpoint does not match the model: " + "; ".join(problems))
    module.load_state_dict(cleaned, strict=True)


def save_single_file(path: str | Path, kind: str, config: Any, tensors: dict[str, torch.Tensor]) -> Path:
    """One safetensors file holding ``tensors``; metadata records ``kind`` and the dataclass ``config``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "config": json.dumps(asdict(config))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def read_single_file(path: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config dict and tensors of a file written by :func:`save_single_file` as ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} tokenizer file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != kind or "config" not in meta:
            raise ValueError(f"{path} is not a {kind} tokenizer file (metadata kind={meta.get('kind')!r})")
        return json.loads(meta["config"]), {k: f.get_tensor(k) for k in f.keys()}
