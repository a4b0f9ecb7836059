"""omnidiff import / ``megatron_weights_from_hf``: stock Qwen2 and Dream folders into the platform.

The folders are made here with random weights: a stock ``Qwen2ForCausalLM`` saved by
transformers 5 (RoPE base 1e4 inside ``rope_parameters``, so the old 1e6 default would show) and a
Dream-format folder (``model_type`` Dream, top-level ``rope_theta``, ``.bin`` shards + index, a
Hugging Face text tokenizer). The engines' side (a checkpoint for TP = 2 x DP = 2, ZeRO-3 and
ZeRO-1) is checked in tests/test_hf_export.py, in the one multi-process run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnidiff.data.tokens.text import HFTextTokenizer, build_vocab
from omnidiff.data.tokens.vocab import UnifiedVocab
from omnidiff.platform.cli import main
from omnidiff.platform.config import build_config
from omnidiff.platform.hf_convert import hf_to_megatron, megatron_to_hf
from omnidiff.platform.hf_export import write_hf_folder
from omnidiff.platform.hf_import import (
    HFImportError, megatron_weights_from_hf, model_section_from_hf)

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
CODEBOOKS = {"image_codebook_size": 16, "speech_codebook_size": 16}
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def stock_qwen2_folder(path: Path, rows: int = 272, seed: int = 0, **config) -> Path:
    """``Qwen2ForCausalLM(Qwen2Config(...)).save_pretrained``: random, RoPE base 1e4."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=rows, rope_theta=10_000.0, **SHAPE, **config)
                     ).save_pretrained(path)
    return path


def hf_text_tokenizer(path: Path) -> Path:
    """A word-level HF tokenizer with Qwen2's chat specials and Dream's ``<|mask|>`` (38)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", *(f"w{i}" for i in range(33)), "<|endoftext|>", "<|im_start|>",
             "<|im_end|>", "<|mask|>"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                        eos_token="<|endoftext|>")
    tokenizer.add_tokens(words[-3:], special_tokens=True)
    tokenizer.save_pretrained(path)
    return path


def dream_folder(path: Path, rows: int = 48, seed: int = 1) -> Path:
    """Dream's layout: its config keys (top-level ``rope_theta`` 5e5, ``rope_scaling`` null),
    Qwen2 tensor names, ``pytorch_model-*.bin`` shards with an index."""
    source = stock_qwen2_folder(path / "source", rows=rows, seed=seed)
    weights = load_file(source / "model.safetensors")
    path.mkdir(exist_ok=True)
    names = sorted(weights)
    index = {}
    for part, keys in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        file = f"pytorch_model-0000{part}-of-00002.bin"
        torch.save({k: weights[k].to(torch.bfloat16) for k in keys}, path / file)
        index |= dict.fromkeys(keys, file)
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index}))
    config = {"architectures": ["DreamModel"], "model_type": "Dream",
              "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                           "AutoModel": "modeling_dream.DreamModel"},
              "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 500_000.0,
              "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "vocab_size": rows, "mask_token_id": 37, "pad_token_id": 34, "bos_token_id": 34,
              "eos_token_id": 34, "use_sliding_window": False, **SHAPE}
    (path / "config.json").write_text(json.dumps(config))
    return path


def run_config(hf_dir: Path, **data) -> object:
    return build_config({"model": model_section_from_hf(hf_dir), "data": {**CODEBOOKS, **data}})


def _imported(hf_dir: Path, cfg, new_rows: str = "normal", seed: int = 7):
    vocab, _ = build_vocab(cfg.data)
    rows = vocab.padded_size(2)
    weights = megatron_weights_from_hf(hf_dir, cfg.model, rows, vocab.text_size, new_rows, seed)
    return vocab, rows, megatron_to_hf(weights, cfg.model)


def test_stock_qwen2_keeps_text_rows_and_draws_new_rows_from_init_std(tmp_path):
    folder = stock_qwen2_folder(tmp_path / "qwen2")
    cfg = run_config(folder)
    assert cfg.model.rope_theta == 10_000.0  # read from rope_parameters
    original = load_file(folder / "model.safetensors")
    vocab, rows, got = _imported(folder, cfg)
    assert vocab.text_size == 260 and rows == 320  # byte text + 21 + 16 + 16, padded to 16
    for key, value in original.items():
        if key in VOCAB_KEYS:
            assert got[key].shape == (rows, 64)
            assert torch.equal(got[key][:260], value[:260]), key  # text ids keep their rows
            fresh = got[key][260:]
            assert abs(fresh.std().item() - cfg.model.init_std) < 0.1 * cfg.model.init_std
            assert abs(fresh.mean().item()) < 0.003
        else:
            assert torch.equal(got[key], value), key
    again = _imported(folder, cfg)[2]
    other_seed = _imported(folder, cfg, seed=8)[2]
    assert torch.equal(again["lm_head.weight"], got["lm_head.weight"])  # deterministic by seed
    assert not torch.equal(other_seed["lm_head.weight"][260:], got["lm_head.weight"][260:])


def test_mean_rows_are_the_mean_of_the_kept_rows_and_tied_heads_are_untied(tmp_path):
    folder = stock_qwen2_folder(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    _, _, got = _imported(folder, run_config(folder), new_rows="mean")
    for key in VOCAB_KEYS:
        kept = got[key][:260]
        mean = kept.mean(dim=0).expand(got[key].shape[0] - 260, -1)
        torch.testing.assert_close(got[key][260:], mean, atol=0, rtol=0)
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_dream_folder_with_a_text_tokenizer_round_trips_through_an_export(tmp_path):
    folder = dream_folder(tmp_path / "dream")
    cfg = run_config(folder, text_tokenizer=str(hf_text_tokenizer(tmp_path / "tokenizer")))
    assert cfg.model.rope_theta == 500_000.0  # top-level rope_theta, as Dream writes it
    vocab, rows, got = _imported(folder, cfg)
    assert vocab.text_size == 38 and vocab.mask_id == 37
    source = load_file(folder / "source" / "model.safetensors")
    for key, value in source.items():
        expected = value.to(torch.bfloat16).float()  # Dream's files are bf16
        kept = slice(0, 38) if key in VOCAB_KEYS else slice(None)
        assert torch.equal(got[key][kept], expected[kept]), key

    export = write_hf_folder(cfg, hf_to_megatron(got, cfg.model), tmp_path / "export",
                             progress=False)
    tokenizer = HFTextTokenizer(export)  # the export's tokenizer carries every unified id
    assert UnifiedVocab.from_text_tokenizer(tokenizer, 16, 16) == vocab
    for i in (vocab.mask_id, vocab.begin_of_image_id, vocab.speech_offset, vocab.size - 1):
        assert tokenizer.token_to_id(vocab.token_name(i)) == i
    config = json.loads((export / "config.json").read_text())
    assert (config["vocab_size"], config["real_vocab_size"]) == (rows, vocab.size)

    # Re-importing the export keeps every row (text, multimodal and padding) as it is.
    back = megatron_weights_from_hf(export, cfg.model, rows, vocab.text_size, "mean", seed=0)
    exported = load_file(export / "model.safetensors")
    for key, value in megatron_to_hf(back, cfg.model).items():
        assert torch.equal(value, exported[key]), key


def test_shape_mismatch_is_one_line_naming_the_key(tmp_path):
    folder = stock_qwen2_folder(tmp_path / "qwen2")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFImportError, match=r"model\.layers\.1\.mlp\.down_proj\.weight: shape"):
        _imported(folder, run_config(folder))


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
    ({"num_hidden_layers": 3}, "num_hidden_layers is 3, the run config has model.num_layers"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'")])
def test_config_the_run_cannot_use_is_one_line(tmp_path, capsys, change, message):
    folder = stock_qwen2_folder(tmp_path / "qwen2")
    cfg = run_config(folder)
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFImportError, match=message):
        _imported(folder, cfg)
    capsys.readouterr()
    assert main(["import", str(folder), str(tmp_path / "out"), "--no-checkpoint",
                 "--config", str(_yaml(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.split()[0] in err


def test_import_command_writes_the_export_and_refuses_occupied_or_missing_folders(
        tmp_path, capsys):
    folder = stock_qwen2_folder(tmp_path / "qwen2")
    out = tmp_path / "out"
    args = ["import", str(folder), str(out), "--no-checkpoint", "--quiet", "--new-rows", "mean",
            *(f"--set=data.{k}={v}" for k, v in CODEBOOKS.items())]
    assert main(args) == 0
    assert (out / "export" / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert build_config(_read_yaml(out / "config.yaml")).model.rope_theta == 10_000.0
    capsys.readouterr()
    for argv in (args, ["import", str(tmp_path / "nowhere"), str(tmp_path / "o2")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert main([*args, "--overwrite"]) == 0


def _yaml(tmp_path: Path, cfg) -> Path:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())
