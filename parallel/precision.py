"""The GPU-only numerics, kept thin: Transformer Engine / FP8 checks and apex fused kernels.

Everything else (model, engine, recompute) is shared with the CPU path. What lives here:

- :func:`require_gpu_stack`: a run asking for Transformer Engine or FP8 on a machine that cannot
  give it fails at build time with ONE error naming everything missing. Without it megatron would
  quietly mock TE (``HAVE_TE = False``) and run FP8 configs unquantised.
- FP8 recipe support per GPU (TE's own verdict: FP8 needs compute capability 8.9+, blockwise
  Hopper with CUDA 12.9+, MXFP8 Blackwell). FP8 itself needs no code here: the config's
  ``fp8*`` keys reach megatron's ``TransformerConfig`` and ``TransformerBlock`` enters
  ``fp8_autocast`` itself, reducing amaxes over megatron's TP x DP group of the current
  pipeline stage only (a group spanning stages would hang 1F1B, DeepSpeed #5760).
- apex: ``FusedAdam`` and the fused RMSNorm kernel when apex's CUDA extensions are built, the
  torch implementations otherwise (and always for CPU tensors).
- Parameter names of the TE spec vs the portable spec (TE fuses each pre-norm into the linear
  that follows it), so checkpoints move between the two.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping

import torch

from omnidiff.kernels.rmsnorm import RMSNorm
from omnidiff.platform.config import ConfigError, ParallelConfig


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


class ApexRMSNorm(RMSNorm):
    """The portable RMSNorm with apex's fused kernel for CUDA tensors (the reference otherwise).

    Same parameter, same ``sequence_parallel`` tag; apex scales in fp32 and casts once, the
    reference casts before scaling, so bf16 outputs differ by rounding only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine

            return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        return super().forward(x)


def portable_norm() -> type[RMSNorm]:
    """The RMSNorm class of the portable spec: apex-fused when apex's kernel is built."""
    return ApexRMSNorm if apex_extension_available("fused_layer_norm_cuda") else RMSNorm


def adamw(param_groups: list[dict], lr: float, betas: tuple[float, float],
          eps: float) -> torch.optim.Optimizer:
    """AdamW: apex ``FusedAdam`` for CUDA parameters when built, else torch (fused on CUDA)."""
    on_cuda = any(p.is_cuda for group in param_groups for p in group["params"])
    if on_cuda and apex_extension_available("amp_C"):
        from apex.optimizers import FusedAdam

        return FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps,
                             fused=True if on_cuda else None)


# portable parameter name suffix -> TE spec name (the norm fused into the following linear)
TE_PARAMETER_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _renamed(state: Mapping[str, torch.Tensor],
             table: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Suffix renames; ``_extra_state`` (TE's FP8 metadata, None in megatron's local linears)
    is dropped: it has no counterpart in the other spec, whose modules keep their own."""
    renamed = {}
    for name, value in state.items():
        if name.endswith("._extra_state"):
            continue
        for old_suffix, new_suffix in table.items():
            if name.endswith("." + old_suffix):
                name = name[: -len(old_suffix)] + new_suffix
        renamed[name] = value
    return renamed


def to_transformer_engine_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A portable-spec state dict under the TE spec's parameter names."""
    return _renamed(state, TE_PARAMETER_NAMES)


def to_portable_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TE-spec state dict under the portable spec's parameter names."""
    return _renamed(state, {te: portable for portable, te in TE_PARAMETER_NAMES.items()})
