"""A platform checkpoint of any layout (TP / PP / ZeRO 0-3) as a Hugging Face folder.

The folder loads with stock ``transformers`` and nothing of omnidiff installed::

    AutoModel.from_pretrained(folder, trust_remote_code=True)   # or AutoModelForMaskedLM

It holds ``config.json`` (``auto_map`` -> the copied model file, ``vocab_size`` = padded
embedding rows, ``real_vocab_size`` = ids that are tokens, the media tokenizer refs), the model
file :mod:`omnidiff.platform.hf_model` copied as ``modeling_omnidiffusion.py`` (it imports only
torch and transformers), the weights as safetensors (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` past the shard size),
``generation_config.json`` with Dream's sampling keys, ``omnidiff_vocab.json`` (the unified
vocabulary: special ids, speech / image offsets and codebook sizes), the resolved run config
(``run_config.yaml``, what ``omnidiff sample`` reads) and, for a Hugging Face text tokenizer,
the tokenizer with every multimodal token added at its unified-vocabulary id.

The folder is written next to its destination and renamed into place, so a failed export leaves
nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm import tqdm

from omnidiff import UserError
from omnidiff.data.config import DataConfig
from omnidiff.data.tokens.text import build_vocab
from omnidiff.data.tokens.vocab import CHAT_SPECIALS, MULTIMODAL_SPECIALS, UnifiedVocab
from omnidiff.parallel.resharding import to_portable_names
from omnidiff.platform import checkpoint, hf_model
from omnidiff.platform.config import RunConfig, build_config, dump_config
from omnidiff.platform.hf_convert import hf_config_from, megatron_to_hf
from omnidiff.platform.sampling.models import RUN_CONFIG
from omnidiff.platform.sampling.sampler import SamplerConfig
from omnidiff.platform.weights import full_weights

Tensor = torch.Tensor
MODELING_FILE = "modeling_omnidiffusion.py"
VOCAB_FILE = "omnidiff_vocab.json"
GENERATION_FILE = "generation_config.json"
DEFAULT_SHARD_SIZE = "2GB"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MODULE = Path(MODELING_FILE).stem
AUTO_MAP = {"AutoConfig": f"{_MODULE}.OmniDiffusionConfig",
            "AutoModel": f"{_MODULE}.OmniDiffusionForMaskedDiffusion",
            "AutoModelForMaskedLM": f"{_MODULE}.OmniDiffusionForMaskedDiffusion"}
# The platform sampler's confidence rules under the names Dream's generation config uses.
DREAM_ALG = {"neg_entropy": "entropy", "max_prob": "maskgit_plus", "margin": "topk_margin"}


class ExportError(UserError):
    """An export that cannot be made (no checkpoint, occupied output folder, mismatched weights)."""


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, *,
                      max_shard_size: int | str = DEFAULT_SHARD_SIZE, dtype: str = "fp32",
                      overwrite: bool = False, progress: bool = True) -> Path:
    """Merge a checkpoint (or a run folder's newest one) into an HF folder at ``out_dir``."""
    path = _checkpoint_path(Path(checkpoint_dir))
    check_target(Path(out_dir), overwrite)
    raw, weights = full_weights(path)  # TP / PP shards merged, ZeRO-3 partitions rebuilt
    return write_hf_folder(build_config(raw), weights, out_dir, max_shard_size=max_shard_size,
                           dtype=dtype, overwrite=overwrite, progress=progress)


def write_hf_folder(cfg: RunConfig, weights: dict[str, Tensor], out_dir: str | Path, *,
                    max_shard_size: int | str = DEFAULT_SHARD_SIZE, dtype: str = "fp32",
                    overwrite: bool = False, progress: bool = True) -> Path:
    """The HF folder of full TP = 1 megatron-named ``weights`` trained under ``cfg``."""
    out = Path(out_dir)
    cfg = cfg.model_copy(update={"data": _local_paths_absolute(cfg.data)})
    check_target(out, overwrite)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    vocab, _ = build_vocab(cfg.data)
    try:
        state = megatron_to_hf(to_portable_names(weights), cfg.model)
    except (KeyError, ValueError) as err:
        raise ExportError(f"the weights do not match model {cfg.model.preset}: "
                          f"{err.args[0] if err.args else err}") from None
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    rows = state["model.embed_tokens.weight"].shape[0]
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        _write_config(cfg, vocab, rows, dtype, partial)
        shutil.copyfile(hf_model.__file__, partial / MODELING_FILE)
        _write_weights(state, partial, max_shard_size, progress)
        _write_tokenizer(cfg.data, vocab, partial)
        _write_json(partial / GENERATION_FILE, generation_config(vocab))
        _write_json(partial / VOCAB_FILE, vocab_layout(cfg.data, vocab, rows))
        (partial / RUN_CONFIG).write_text(dump_config(cfg))
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    except BaseException as err:  # nothing half-written stays behind, whatever stopped it
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError):
            raise ExportError(f"cannot write {out}: {err.strerror or err}") from None
        raise
    return out


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse to write over a file or into a non-empty folder unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: folder not empty (pass --overwrite to replace it)")


def _checkpoint_path(path: Path) -> Path:
    """A checkpoint folder as given, or the newest complete checkpoint of a run folder."""
    if (path / checkpoint.META).is_file():
        return path
    newest = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(path))
    if not newest:
        raise ExportError(f"{path}: not a checkpoint (no {checkpoint.META}) nor a run folder "
                          "with a complete one")
    return newest[-1]


def _write_config(cfg: RunConfig, vocab: UnifiedVocab, rows: int, dtype: str, out: Path) -> None:
    config = hf_config_from(cfg.model, rows, mask_token_id=vocab.mask_id,
                            pad_token_id=vocab.eos_id, label_shift=cfg.diffusion.label_shift,
                            real_vocab_size=vocab.size,
                            speech_feature_size=cfg.data.heard_feature_size)
    config.bos_token_id = vocab.eos_id  # Dream: <|endoftext|> is pad, eos and bos
    config.architectures = [hf_model.OmniDiffusionForMaskedDiffusion.__name__]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = DTYPES[dtype]
    config.media_tokenizers = media_tokenizer_refs(cfg.data)
    config.save_pretrained(out)


def _write_weights(state: dict[str, Tensor], out: Path, max_shard_size: int | str,
                   progress: bool) -> None:
    """Safetensors shards of at most ``max_shard_size`` (+ index when more than one)."""
    try:
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    except ValueError as err:
        raise ExportError(f"shard size {max_shard_size!r}: {err}") from None
    for name, keys in tqdm(split.filename_to_tensors.items(), desc="export", unit="shard",
                           disable=not progress):
        save_file({key: state[key] for key in keys}, out / name, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        _write_json(out / "model.safetensors.index.json", index)


def _write_tokenizer(data: DataConfig, vocab: UnifiedVocab, out: Path) -> None:
    """A Hugging Face text tokenizer with the unified vocabulary's other tokens added at their
    ids (the byte tokenizer has no files: ``omnidiff_vocab.json`` describes it)."""
    if data.text_tokenizer == "byte":
        return
    tokenizer = transformers.AutoTokenizer.from_pretrained(data.text_tokenizer,
                                                           local_files_only=True)
    names = [vocab.token_name(i) for i in range(len(tokenizer), vocab.size)]
    if None in names:
        raise ExportError(f"{data.text_tokenizer}: {len(tokenizer)} entries, the unified "
                          f"vocabulary's text part has {vocab.text_size}")
    tokenizer.add_tokens(names, special_tokens=True)  # in id order: appended at those ids
    for i in (*range(vocab.text_size, vocab.size), *vocab.chat_special_ids.values()):
        name = vocab.token_name(i)
        if tokenizer.convert_tokens_to_ids(name) != i:
            raise ExportError(f"{data.text_tokenizer}: {name} would get id "
                              f"{tokenizer.convert_tokens_to_ids(name)}, the vocabulary has {i}")
    tokenizer.save_pretrained(out)


def _local_paths_absolute(data: DataConfig) -> DataConfig:
    """``data`` with the tokenizer and speech-encoder paths that exist here made absolute: the
    folder then samples from any working directory (a run's paths are relative to where it was
    started; a hub name or a missing path is left as written)."""
    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else path

    update: dict[str, Any] = {"text_tokenizer": data.text_tokenizer if data.text_tokenizer == "byte"
                              else absolute(data.text_tokenizer)}
    for name in ("image_tokenizer", "speech_tokenizer"):
        ref = getattr(data, name)
        if ref is not None:
            update[name] = ref.model_copy(update={"path": absolute(ref.path)})
    if data.speech_encoder:
        update["speech_encoder"] = absolute(data.speech_encoder)
    return data.model_copy(update=update)


def media_tokenizer_refs(data: DataConfig) -> dict[str, dict[str, str]]:
    refs = {"image": data.image_tokenizer, "speech": data.speech_tokenizer}
    return {kind: ref.model_dump() for kind, ref in refs.items() if ref is not None}


def vocab_layout(data: DataConfig, vocab: UnifiedVocab, rows: int) -> dict[str, Any]:
    """The unified vocabulary as data: what a sampler needs to map ids to text and media."""
    specials = (*CHAT_SPECIALS, *MULTIMODAL_SPECIALS)
    return {"text_tokenizer": data.text_tokenizer, "text_vocab_size": data.text_vocab_size,
            "text_size": vocab.text_size, "real_vocab_size": vocab.size, "vocab_size": rows,
            "special_ids": {name: vocab.special_id(name) for name in specials},
            "speech": {"offset": vocab.speech_offset, "codebook_size": vocab.speech_codebook_size},
            "image": {"offset": vocab.image_offset, "codebook_size": vocab.image_codebook_size},
            "media_tokenizers": media_tokenizer_refs(data)}


def generation_config(vocab: UnifiedVocab) -> dict[str, Any]:
    """Dream's ``generation_config.json`` keys, with the platform sampler's defaults."""
    sampler = SamplerConfig()
    return {"alg": DREAM_ALG[sampler.confidence], "alg_temp": None, "steps": sampler.steps,
            "eps": sampler.eps, "temperature": sampler.temperature, "top_p": sampler.top_p,
            "top_k": sampler.top_k, "mask_token_id": vocab.mask_id, "bos_token_id": vocab.eos_id,
            "eos_token_id": vocab.eos_id, "pad_token_id": vocab.eos_id, "output_history": False,
            "return_dict_in_generate": False, "transformers_version": transformers.__version__}


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")
