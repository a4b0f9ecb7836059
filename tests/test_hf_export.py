"""omnidiff export: a checkpoint of any layout -> a Hugging Face folder that stock transformers
loads without omnidiff.

Fast tests export a one-rank checkpoint (files, config, vocabulary, one-line errors). The slow
test runs one world of 4 spawned processes that writes three checkpoints the real way: a 1-step
training run at TP = 2 x PP = 2, and engines at TP = 2 x DP = 2 loaded with imported weights
(ZeRO-3 from a stock Qwen2 folder, ZeRO-1 from a Dream-format one). The first export is loaded in
a fresh interpreter where ``import omnidiff`` fails and must give the platform model's logits;
the other two must give back the imported weights exactly, ZeRO-3's fp32 partitions included.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from omnidiff.data.tokenizers.demo_image import PatchKMeansImageTokenizer
from omnidiff.data.tokens.packing import TokenSample, collate_rows
from omnidiff.data.tokens.text import build_vocab
from omnidiff.platform import checkpoint
from omnidiff.platform.cli import main
from omnidiff.platform.config import build_config
from omnidiff.platform.hf_convert import megatron_shapes, megatron_to_hf
from omnidiff.platform.hf_export import export_checkpoint
from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion
from test_hf_import import CODEBOOKS, VOCAB_KEYS, dream_folder, run_config, stock_qwen2_folder

TINY = {"model": {"preset": "tiny", "num_layers": 2},
        "data": {"seq_length": 64, "micro_batch_size": 1, "global_batch_size": 2, **CODEBOOKS},
        "schedule": {"train_steps": 1}, "logging": {"progress_bar": False},
        "checkpoint": {"keep_last": 1}}


def _one_rank_checkpoint(root: Path, **data) -> tuple[Path, dict[str, torch.Tensor], object]:
    """A world-of-one checkpoint with random weights, saved by the platform's checkpoint code."""
    cfg = build_config({**TINY, "data": {**TINY["data"], **data}, "output_dir": str(root)})
    rows = build_vocab(cfg.data)[0].padded_size(1)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g)
             for k, shape in megatron_shapes(cfg.model, rows).items()}
    path = checkpoint.save(root, 1, {"engine": {"model": state}, "step": 1}, keep_last=1,
                           meta={"config": cfg.model_dump(mode="json")})
    return path, state, cfg


def test_export_writes_a_sharded_folder_with_config_vocabulary_and_generation_config(tmp_path):
    _, state, cfg = _one_rank_checkpoint(tmp_path / "run")
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf", max_shard_size="200KB",
                            progress=False)  # a run folder: its newest checkpoint
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((out / name).is_file() for name in shards)

    vocab = build_vocab(cfg.data)[0]
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["real_vocab_size"]) == (vocab.padded_size(1), vocab.size)
    assert config["auto_map"]["AutoModel"] == (
        "modeling_omnidiffusion.OmniDiffusionForMaskedDiffusion")
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 10_000.0
    assert config["mask_token_id"] == vocab.mask_id and config["label_shift"] is True
    assert "import omnidiff" not in (out / "modeling_omnidiffusion.py").read_text()

    layout = json.loads((out / "omnidiff_vocab.json").read_text())
    assert layout["text_size"] == vocab.text_size and layout["text_tokenizer"] == "byte"
    assert layout["image"] == {"offset": vocab.image_offset, "codebook_size": 16}
    assert layout["special_ids"]["<|begin_of_audio|>"] == vocab.begin_of_audio_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["mask_token_id"] == vocab.mask_id and generation["alg"] == "entropy"
    assert {"steps", "eps", "temperature", "alg_temp"} <= set(generation)
    assert yaml.safe_load((out / "run_config.yaml").read_text())["model"]["num_layers"] == 2

    model = OmniDiffusionForMaskedDiffusion.from_pretrained(out)
    expected = megatron_to_hf(state, cfg.model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_export_errors_are_one_line(tmp_path, capsys):
    path, _, _ = _one_rank_checkpoint(tmp_path / "run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    shard = path / checkpoint.shard_name(0)
    cases = [([str(tmp_path / "missing"), str(tmp_path / "a")], "not a checkpoint"),
             ([str(path), str(tmp_path / "full")], "not empty (pass --overwrite"),
             ([str(path), str(tmp_path / "b"), "--shard-size", "lots"], "shard size")]
    for argv, message in cases:
        assert main(["export", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the middle of the weights
    shard.write_bytes(bytes(data))
    assert main(["export", str(path), str(tmp_path / "c"), "--quiet"]) == 2
    assert "do not match the checksum" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / ".c.partial").exists()


# --- the real layouts, written by engines in one world of 4 processes ------------------------
def _layouts_worker(root: str) -> None:
    """Spawned rank: train TP2 x PP2 for one step, then write the two imported checkpoints."""
    from omnidiff.parallel import topology
    from omnidiff.platform.hf_import import write_layout_checkpoint
    from omnidiff.platform.trainer import Trainer

    root_path = Path(root)
    try:
        Trainer(build_config(yaml.safe_load((root_path / "train.yaml").read_text()))).run()
        for name in ("qwen2", "dream"):
            folder = root_path / name
            cfg = build_config(yaml.safe_load((folder / "config.yaml").read_text()))
            write_layout_checkpoint(cfg, folder / "export", folder)
    finally:
        topology.destroy()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    from omnidiff.parallel.launcher import spawn
    from omnidiff.platform.hf_import import import_folder

    root = tmp_path_factory.mktemp("layouts")
    train = {**TINY, "output_dir": str(root / "train"),
             "parallel": {"tensor_parallel": 2, "pipeline_parallel": 2, "nproc_per_node": 4}}
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    for name, folder, zero in (("qwen2", stock_qwen2_folder(root / "hf-qwen2"), 3),
                               ("dream", dream_folder(root / "hf-dream"), 1)):
        cfg = run_config(folder).model_dump(mode="json")
        cfg["parallel"] = {"tensor_parallel": 2, "zero_stage": zero, "nproc_per_node": 4}
        cfg["data"]["global_batch_size"] = 2
        import_folder(folder, root / name, build_config(cfg), checkpoint_layout=False,
                      progress=False)
    spawn(_layouts_worker, 4, str(root))
    return root


FRESH = textwrap.dedent("""
    import sys
    sys.path += sys.argv.pop(1).split(":")  # the test's site-packages, without its .pth files
    try:
        import omnidiff
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("omnidiff is importable here")
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM
    folder, batch_file, out_file = sys.argv[1:]
    batch = torch.load(batch_file, weights_only=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model) is type(AutoModelForMaskedLM.from_pretrained(folder,
                                                                    trust_remote_code=True))
    assert "omnidiff" not in sys.modules
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                       segment_ids=batch["segment_ids"]).logits
    torch.save({"logits": logits, "module": type(model).__module__}, out_file)
""")


def _packed_batch(vocab_size: int):
    g = torch.Generator().manual_seed(3)
    rows = [[9, 13, 6], [17, 5]]  # sample lengths; both rows end in padding
    samples = [[TokenSample(torch.randint(1, vocab_size, (n,), generator=g),
                            torch.ones(n, dtype=torch.bool)) for n in row] for row in rows]
    return collate_rows(samples, seq_length=32, pad_id=0)


@pytest.mark.slow
def test_tp2_pp2_export_loads_in_stock_transformers_without_omnidiff(layouts, tmp_path,
                                                                     single_process):
    from omnidiff.parallel.model import build_model
    from omnidiff.platform.config import ParallelConfig
    from omnidiff.platform.weights import full_weights

    trained = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(layouts / "train"))[-1]
    out = export_checkpoint(trained, tmp_path / "hf", progress=False)
    raw, full = full_weights(trained)
    cfg = build_config(raw)
    vocab = build_vocab(cfg.data)[0]
    batch = _packed_batch(vocab.size)
    torch.save({"input_ids": batch.input_ids, "position_ids": batch.position_ids,
                "segment_ids": batch.segment_ids}, tmp_path / "batch.pt")
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", FRESH, ":".join(site.getsitepackages()), str(out),
         str(tmp_path / "batch.pt"),
         str(tmp_path / "logits.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
             "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert result["module"].startswith("transformers_modules.")  # the copied modeling file

    model = build_model(cfg.model, ParallelConfig(), vocab.padded_size(2),
                        perform_initialization=False).eval()
    model.load_state_dict(full, strict=False)
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.position_ids, batch.segment_ids)
        expected = model.logits(hidden).transpose(0, 1)
    real = batch.segment_ids > 0
    torch.testing.assert_close(result["logits"][real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name, zero", [("qwen2", 3), ("dream", 1)])
def test_imported_weights_come_back_exactly_from_a_tp2_dp2_checkpoint(layouts, tmp_path, name,
                                                                     zero):
    saved = layouts / name / "checkpoints" / "step_00000000"
    meta = checkpoint.read_meta(saved)
    assert meta["world_size"] == 4 and meta["config"]["parallel"]["zero_stage"] == zero
    out = export_checkpoint(saved, tmp_path / "hf", progress=False)
    imported = load_file(layouts / name / "export" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == imported.keys()
    for key, value in imported.items():
        assert torch.equal(exported[key], value), key
    # ... and those are the source folder's own weights, text rows included.
    source = load_file(layouts / f"hf-{name}" / ("source" if name == "dream" else "") /
                       "model.safetensors")
    for key, value in source.items():
        kept = slice(0, min(len(value), 260)) if key in VOCAB_KEYS else slice(None)  # byte text
        want = value.to(torch.bfloat16).float() if name == "dream" else value
        assert torch.equal(exported[key][kept], want[kept]), key


def test_exported_tokenizer_paths_hold_from_any_working_directory(tmp_path, monkeypatch):
    """A run started in its project folder names its tokenizers relative to it; the export's
    run config and config.json name them absolutely (sampling is often run elsewhere)."""
    (tmp_path / "tok").mkdir()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    PatchKMeansImageTokenizer.fit(images, 16, seed=0, patch_size=4, epochs=1).save(
        tmp_path / "tok" / "image.safetensors")
    monkeypatch.chdir(tmp_path)
    _one_rank_checkpoint(tmp_path / "run", image_tokenizer={
        "kind": "kmeans_image", "path": "tok/image.safetensors"},
        speech_tokenizer={"kind": "kmeans_speech", "path": "tok/not-fitted-yet.safetensors"})
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf", progress=False)
    data = yaml.safe_load((out / "run_config.yaml").read_text())["data"]
    assert data["image_tokenizer"]["path"] == str(tmp_path / "tok" / "image.safetensors")
    assert data["speech_tokenizer"]["path"] == "tok/not-fitted-yet.safetensors"  # not here
    assert data["text_tokenizer"] == "byte"
    refs = json.loads((out / "config.json").read_text())["media_tokenizers"]
    assert refs["image"]["path"] == str(tmp_path / "tok" / "image.safetensors")
