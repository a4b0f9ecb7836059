"""``omnidiff sample`` end to end on a real tiny checkpoint (a model trained here to answer two
questions), an HF folder, media in and out, and its one-line errors; ``full_weights`` refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from omnidiff.data.tokenizers.demo_image import PatchKMeansImageTokenizer
from omnidiff.data.tokenizers.demo_speech import MelKMeansSpeechTokenizer
from omnidiff.data.tokens.sequences import SequenceBuilder
from omnidiff.data.tokens.text import build_vocab
from omnidiff.platform import checkpoint
from omnidiff.platform.cli import main
from omnidiff.platform.config import load_config
from omnidiff.platform.hf_convert import hf_config_from, hf_to_megatron
from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion
from omnidiff.platform.weights import WeightsError, full_weights

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
ANSWER_LENGTH = 8
QA = [("Which colour is the red circle?", "red"), ("Which shape is green?", "a star")]
SHAPE = ["model.preset=custom", "model.hidden_size=64", "model.num_layers=2",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=128",
         "model.rope_theta=10000.0", "data.image_codebook_size=16",
         "data.speech_codebook_size=16", "data.seq_length=128", "data.image_size=16",
         "data.generated_image_size=16"]


def _memorising_model(cfg) -> OmniDiffusionForMaskedDiffusion:
    """The tiny model trained (masked diffusion, label shift) until it answers ``QA``."""
    vocab, tokenizer = build_vocab(cfg.data)
    builder = SequenceBuilder(vocab, tokenizer)
    rows, targets = [], []
    for question, answer in QA:
        sample = builder.chat([(question, answer)])
        pads = ANSWER_LENGTH - int(sample.target_mask.sum())
        rows.append(torch.cat([sample.tokens, torch.full((pads,), vocab.eos_id)]))
        targets.append(torch.cat([sample.target_mask, torch.ones(pads, dtype=torch.bool)]))
    width = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (0, width - len(r)), value=vocab.eos_id) for r in rows])
    target = torch.stack([F.pad(t, (0, width - len(t))) for t in targets])
    segments = torch.stack([F.pad(torch.ones(len(r), dtype=torch.long), (0, width - len(r)))
                            for r in rows])
    torch.manual_seed(0)
    model = OmniDiffusionForMaskedDiffusion(hf_config_from(
        cfg.model, vocab.padded_size(), mask_token_id=vocab.mask_id, pad_token_id=vocab.eos_id))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        level = torch.rand(len(rows), 1, generator=generator)
        masked = target & (torch.rand(ids.shape, generator=generator) <= level)
        if not masked.any():
            continue
        inputs = torch.where(masked, vocab.mask_id, ids)
        logits = model(inputs, segment_ids=segments).logits[:, :-1]  # logit i predicts i + 1
        loss = F.cross_entropy(logits[masked[:, 1:]], ids[:, 1:][masked[:, 1:]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder: fitted demo tokenizers and a step-1 checkpoint of the memorising model."""
    root = tmp_path_factory.mktemp("run")
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    PatchKMeansImageTokenizer.fit(images, 16, seed=0, patch_size=4, epochs=2).save(
        root / "image.safetensors")
    noise = [torch.randn(16_000, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(2)]
    MelKMeansSpeechTokenizer.fit(noise, 16, seed=0, epochs=2, griffin_lim_iters=2).save(
        root / "speech.safetensors")
    cfg = load_config(None, [*SHAPE, f"output_dir={root}",
                             f"data.image_tokenizer={{kind: kmeans_image, path: {root}/image.safetensors}}",
                             f"data.speech_tokenizer={{kind: kmeans_speech, path: {root}/speech.safetensors}}"])
    model = _memorising_model(cfg)
    state = {"engine": {"model": hf_to_megatron(model.state_dict(), cfg.model)}, "step": 1}
    checkpoint.save(root, 1, state, keep_last=1, meta={"config": cfg.model_dump(mode="json")})
    model.save_pretrained(root / "hf")
    (root / "hf" / "run_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return root


def _sample(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["sample", *map(str, args), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _step(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_00000001"


def test_a_trained_checkpoint_answers_from_the_command_line(run_dir):
    result = subprocess.run(
        [sys.executable, "-m", "omnidiff.platform.cli", "sample", str(_step(run_dir)), "--task",
         "text", "--prompt", QA[0][0], "--length", str(ANSWER_LENGTH), "--steps", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == QA[0][1]
    assert "sample" in result.stderr  # the progress bar


def test_hf_folder_and_run_folder_sample_the_same_answers(run_dir, capsys):
    for model in (run_dir / "hf", run_dir):
        code, out, err = _sample(capsys, model, "--task", "text", "--prompt", QA[1][0],
                                 "--length", ANSWER_LENGTH)
        assert code == 0, err
        assert out.strip() == QA[1][1]


def test_media_in_and_out(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _sample(capsys, _step(run_dir), "--task", "t2i", "--prompt", "a red circle",
                                "--out", out, "--steps", 4, "--restrict-modality")
    assert code == 0, err
    assert Image.open(out / "t2i-0.png").size == (16, 16)
    code, stdout, err = _sample(capsys, _step(run_dir), "--task", "tts", "--prompt", "red",
                                "--out", out, "--restrict-modality")
    assert code == 0, err
    wave, rate = soundfile.read(out / "tts-0.wav")
    codes = int(re.search(r"\((\d+) speech codes", stdout).group(1))
    assert rate == 16_000 and codes > 0
    assert len(wave) == codes * 1280  # the demo decoder: 12.5 codes/s at 16 kHz
    Image.fromarray(np.full((20, 24, 3), 200, dtype=np.uint8)).save(tmp_path / "in.png")
    soundfile.write(tmp_path / "in.wav", np.zeros(8000, dtype=np.float32), 8000)
    for task, flag, path in (("caption", "--image", "in.png"), ("asr", "--speech", "in.wav")):
        code, _, err = _sample(capsys, _step(run_dir), "--task", task, flag, tmp_path / path,
                               "--steps", 2)
        assert code == 0, err


def _one_line_error(capsys, *args) -> str:
    code, _, err = _sample(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_user_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    step = _step(run_dir)
    assert "unknown task 'paint'" in _one_line_error(capsys, step, "--task", "paint", "--prompt", "x")
    assert "not a checkpoint" in _one_line_error(capsys, tmp_path / "nothing", "--task", "text",
                                                 "--prompt", "x")
    long = "why " * 40
    assert "exceed the model's length data.seq_length=128" in _one_line_error(
        capsys, step, "--task", "text", "--prompt", long)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    line = _one_line_error(capsys, step, "--task", "t2i", "--prompt", "x", "--set",
                           f"data.image_tokenizer.path={corrupt}")
    assert "data.image_tokenizer" in line and "cannot load" in line
    line = _one_line_error(capsys, step, "--task", "tts", "--prompt", "x", "--set",
                           f"data.speech_tokenizer.path={tmp_path / 'missing.safetensors'}")
    assert "data.speech_tokenizer" in line and "not found" in line
    assert "--temperature" in _one_line_error(capsys, step, "--task", "text", "--prompt", "x",
                                              "--temperature", "-1")
    assert _one_line_error(capsys, step, "--task", "t2i", "--prompt", "x", "--set",
                           "data.image_tokenizer=null") == (
        "error: data.image_tokenizer is not set in the run config (give it with --set "
        "data.image_tokenizer.kind=... --set data.image_tokenizer.path=...)")


def _copy_checkpoint(run_dir: Path, target: Path, shard: dict, meta_update: dict) -> Path:
    target.mkdir(parents=True)
    torch.save(shard, target / checkpoint.shard_name(0))
    meta = json.loads((_step(run_dir) / checkpoint.META).read_text())
    meta["files"] = {checkpoint.shard_name(0): {"sha256": checkpoint.sha256(target / "rank00000.pt"),
                                                "bytes": (target / "rank00000.pt").stat().st_size}}
    (target / checkpoint.META).write_text(json.dumps({**meta, **meta_update}))
    return target


def test_full_weights_refuses_unsafe_weightless_and_old_checkpoints(run_dir, tmp_path):
    raw, state = full_weights(_step(run_dir))
    assert raw["model"]["hidden_size"] == 64 and "decoder.layers.1.mlp.linear_fc1.weight" in state
    pickled = _copy_checkpoint(run_dir, tmp_path / "pickled",
                               {"engine": {"model": {}}, "made_by": Fraction(1, 3)}, {})
    with pytest.raises(WeightsError, match="predates safe checkpoints"):
        full_weights(pickled)
    weightless = _copy_checkpoint(run_dir, tmp_path / "weightless", {"engine": {"model": None}}, {})
    with pytest.raises(WeightsError, match="no model weights .* without ZeRO-3"):
        full_weights(weightless)
    old = _copy_checkpoint(run_dir, tmp_path / "old", {"engine": {"model": {}}}, {"format": 1})
    with pytest.raises(checkpoint.CheckpointError, match="older omnidiff"):
        full_weights(old)
