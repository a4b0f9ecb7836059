"""What this machine's GPU stack can run: Transformer Engine, FP8 recipes, apex extensions.

- :func:`require_gpu_stack`: a run asking for Transformer Engine or FP8 on a machine that cannot
  give it fails at build time with ONE error naming everything missing. Without it megatron would
  quietly mock TE (``HAVE_TE = False``) and run FP8 configs unquantised.
- FP8 recipe support per GPU (TE's own verdict: FP8 needs compute capability 8.9+, blockwise
  Hopper with CUDA 12.9+, MXFP8 Blackwell). FP8 itself needs no code here: the config's
  ``fp8*`` keys reach megatron's ``TransformerConfig`` and ``TransformerBlock`` enters
  ``fp8_autocast`` itself, reducing amaxes over megatron's TP x DP group of the current
  pipeline stage only (a group spanning stages would hang 1F1B, DeepSpeed #5760).
- :func:`apex_extension_available`: whether apex's fused kernels (FusedAdam, RMSNorm) are built.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from omnidiff import ConfigError
from omnidiff.parallel.config import ParallelConfig


class MissingGPUStackError(ConfigError):
    """The config asks for the GPU stack (TE, FP8) on a machine that cannot run it."""


# recipe -> (minimum transformer-engine megatron-core 0.16.1 accepts, TE's support check)
_FP8_RECIPES = {
    "delayed": ("1.0.0", "is_fp8_available"),
    "tensorwise": ("2.2.0.dev0", "is_fp8_available"),
    "blockwise": ("2.3.0.dev0", "is_fp8_block_scaling_available"),
    "mxfp8": ("2.1.0", "is_mxfp8_available"),
}


def transformer_engine_problem() -> str | None:
    """Why Transformer Engine cannot be used here, or None when it can.

    Imports what megatron-core 0.16.1 imports (``transformer_engine.pytorch.fp8``): when that
    fails, megatron silently swaps TE for mocks.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return ("not installed; it builds only against a CUDA torch, use the Dockerfile's NGC "
                "image")
    try:
        importlib.import_module("transformer_engine.pytorch.fp8")
    except (ImportError, OSError, RuntimeError) as err:
        return f"installed but fails to import: {err}"
    return None


def fp8_recipe_support(recipe: str) -> tuple[bool, str]:
    """Whether this GPU and transformer-engine run FP8 ``recipe``; TE's reason when not."""
    from megatron.core.utils import is_te_min_version
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    minimum, check = _FP8_RECIPES[recipe]
    if not is_te_min_version(minimum):
        return False, f"fp8_recipe {recipe} needs transformer-engine >= {minimum}"
    return getattr(FP8GlobalStateManager, check)()


def missing_gpu_stack(fp8_recipe: str | None = None) -> list[str]:
    """What this machine lacks for the TE spec (and for FP8 ``fp8_recipe`` when given)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none is visible to torch)")
    problem = transformer_engine_problem()
    if problem:
        missing.append(f"the transformer-engine package ({problem})")
    if fp8_recipe and not missing:
        supported, reason = fp8_recipe_support(fp8_recipe)
        if not supported:
            missing.append(f"FP8 support for it ({reason})")
    return missing


def require_gpu_stack(parallel: ParallelConfig) -> None:
    """Raise :class:`MissingGPUStackError` naming all that ``parallel`` needs and lacks here."""
    if not (parallel.transformer_engine or parallel.fp8):
        return
    missing = missing_gpu_stack(parallel.fp8_recipe if parallel.fp8 else None)
    if missing:
        request = (f"parallel.fp8={parallel.fp8} (fp8_recipe {parallel.fp8_recipe})"
                   if parallel.fp8 else "parallel.transformer_engine=true")
        raise MissingGPUStackError(f"{request} needs " + " and ".join(missing))


def apex_extension_available(extension: str) -> bool:
    """True when apex and its compiled CUDA ``extension`` (e.g. ``amp_C``) are importable."""
    return (importlib.util.find_spec("apex") is not None
            and importlib.util.find_spec(extension) is not None)
