"""The sampler's model forms: ``logits_fn`` adapters and loading a model to sample from.

* the megatron-core model at any TP: each rank's vocabulary shard of the logits is all-gathered
  over the TP group, so every rank holds the same full logits; :func:`tp_sync` broadcasts the
  chosen tokens from TP rank 0 (ranks then agree by construction, not by floating-point luck);
* the HF class ``OmniDiffusionForMaskedDiffusion`` (also what a saved HF folder loads as);
* :func:`load_model`: a platform checkpoint (merged to TP = 1, see :mod:`omnidiff.platform.weights`),
  a run's output folder (its newest checkpoint) or an HF folder, as the HF class plus the run
  config that defines its vocabulary and media tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from omnidiff.parallel.collectives import all_gather, broadcast
from omnidiff import UserError
from omnidiff.data.tokens.text import build_vocab
from omnidiff.parallel.resharding import to_portable_names
from omnidiff.platform import checkpoint
from omnidiff.platform.config import RunConfig, apply_overrides, build_config
from omnidiff.platform.hf_convert import hf_config_from, megatron_to_hf
from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion
from omnidiff.platform.sampling.sampler import LogitsFn, SyncFn
from omnidiff.platform.weights import full_weights

Tensor = torch.Tensor
RUN_CONFIG = "run_config.yaml"  # the resolved run config inside an HF folder


class ModelLoadError(UserError):
    """A path that is no loadable model (missing, corrupt, or without a run config)."""


def hf_logits_fn(model: nn.Module) -> LogitsFn:
    """``logits_fn`` of the HF class: packed rows by ``segment_ids``."""
    def logits_fn(input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor) -> Tensor:
        return model(input_ids, position_ids=position_ids, segment_ids=segment_ids).logits

    return logits_fn


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def megatron_logits_fn(model: nn.Module, group=None) -> LogitsFn:
    """``logits_fn`` of ``OmniDiffusionTransformer`` (whole model, PP = 1) at any TP.

    Under sequence parallelism the rows are padded to a multiple of TP (segment 0: ignored).
    """
    if not (model.pre_process and model.post_process):
        raise ValueError("sampling needs the whole model in one pipeline stage (PP = 1)")
    group = group if group is not None else _tp_group()
    tp = dist.get_world_size(group)
    device = next(model.parameters()).device  # inputs go there, logits come back

    def logits_fn(input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor) -> Tensor:
        width = input_ids.shape[1]
        pad = -width % tp if model.config.sequence_parallel else 0
        if pad:
            input_ids, position_ids, segment_ids = (
                nn.functional.pad(t, (0, pad)) for t in (input_ids, position_ids, segment_ids))
        host = input_ids.device
        input_ids, position_ids, segment_ids = (
            t.to(device) for t in (input_ids, position_ids, segment_ids))
        local = model.logits(model(input_ids, position_ids, segment_ids))  # [s, b, V / tp]
        if tp > 1:  # every TP rank's vocabulary shard
            local = torch.cat(all_gather(local, group, local.device, "logits"), dim=-1)
        return local.transpose(0, 1)[:, :width].to(host)

    return logits_fn


def tp_sync(group=None) -> SyncFn:
    """Broadcast tokens from TP rank 0 to the other ranks of its TP group, in place."""
    group = group if group is not None else _tp_group()
    source = dist.get_global_rank(group, 0)

    def sync(tokens: Tensor) -> None:
        broadcast(tokens, source, group, tokens.device, "sampled tokens")

    return sync


@dataclass
class LoadedModel:
    """A model to sample from, and the run config (vocabulary, tokenizers, length) it belongs to."""

    model: OmniDiffusionForMaskedDiffusion
    config: RunConfig
    source: Path

    @property
    def label_shift(self) -> bool:
        return bool(self.model.config.label_shift)


def load_model(path: str | Path, config_path: str | Path | None = None,
               overrides: list[str] = ()) -> LoadedModel:
    """A platform checkpoint, a run's output folder or an HF folder, in eval mode on CPU.

    ``config_path`` (a run config YAML) replaces the config found with the model; ``overrides``
    (``section.key=value``) apply on top, e.g. to point at media tokenizers elsewhere.
    """
    path = Path(path)
    if checkpoint.checkpoint_root(path).is_dir() and not (path / checkpoint.META).is_file():
        found = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(path))
        if not found:
            raise ModelLoadError(f"{path}: a run folder without a complete checkpoint")
        path = found[-1]
    if (path / checkpoint.META).is_file():
        raw, state = full_weights(path)
        cfg = _config(raw if config_path is None else _read_yaml(Path(config_path)), overrides, path)
        model = _from_megatron(state, cfg)
    elif (path / "config.json").is_file():
        model = _from_hf_folder(path)
        config_file = Path(config_path) if config_path is not None else path / RUN_CONFIG
        if not config_file.is_file():
            raise ModelLoadError(f"{path}: HF folder without {RUN_CONFIG}; pass the run config "
                                 "with --config")
        cfg = _config(_read_yaml(config_file), overrides, config_file)
    else:
        raise ModelLoadError(f"{path}: not a checkpoint (no {checkpoint.META}), a run folder "
                             "or an HF folder (no config.json)")
    return LoadedModel(model.eval(), cfg, path)


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ModelLoadError(f"{path}: unreadable run config ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: a run config must be a mapping of sections")
    return raw


def _config(raw: dict, overrides: list[str], where: Path) -> RunConfig:
    """The validated run config, ``overrides`` applied."""
    try:
        return build_config(apply_overrides(raw, list(overrides)))
    except UserError as err:
        raise ModelLoadError(f"{where}: run config: {err}".replace("\n", "; ")) from None


def _from_megatron(state: dict[str, Tensor], cfg: RunConfig) -> OmniDiffusionForMaskedDiffusion:
    """The HF class holding the checkpoint's weights (built on the meta device: no random
    initialisation of weights that are replaced anyway)."""
    try:
        weights = megatron_to_hf(to_portable_names(state), cfg.model)
    except (KeyError, ValueError) as err:
        raise ModelLoadError(f"checkpoint weights do not match model {cfg.model.preset}: "
                             f"{err}") from None
    vocab, _ = build_vocab(cfg.data)
    rows = weights["model.embed_tokens.weight"].shape[0]
    with torch.device("meta"):
        model = OmniDiffusionForMaskedDiffusion(hf_config_from(
            cfg.model, rows, mask_token_id=vocab.mask_id, pad_token_id=vocab.eos_id,
            label_shift=cfg.diffusion.label_shift))
    model.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    return model


def _from_hf_folder(path: Path) -> OmniDiffusionForMaskedDiffusion:
    try:
        return OmniDiffusionForMaskedDiffusion.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read a user-given folder is one line
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(f"{path}: cannot load the HF model ({message})") from None
