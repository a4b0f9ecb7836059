"""SenseVoiceSmall speech encoder (front end, SAN-M encoder, released checkpoint layout) and the
trainable speech projector. Weights are random, saved by the tests in the released layout."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from omnidiff.data.tokenizers.checkpoint import CheckpointMismatchError
from omnidiff.data.tokenizers.fbank import (
    FrontendConfig,
    fbank,
    fbank_reference,
    lfr,
    lfr_reference,
    read_am_mvn,
    write_am_mvn,
)
from omnidiff.data.tokenizers.sensevoice import (
    NUM_QUERIES,
    SenseVoiceConfig,
    SenseVoiceSmall,
    SenseVoiceSpeechEncoder,
    SpeechProjector,
)

SR = 16_000
SMALL = SenseVoiceConfig(output_size=64, attention_heads=4, linear_units=128, num_blocks=3, tp_blocks=2)
SMALL_CTC_VOCAB = 50  # the released CTC head is [25055, 512]; it is skipped on load


pytestmark = pytest.mark.usefixtures("one_thread")


def speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    """Voiced-sounding test signal: gliding harmonics, syllable envelope, a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    f0 = 120 + 30 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t).clamp_min(0)
    return (0.2 * voiced * envelope + 0.005 * torch.randn(t.shape, generator=g, dtype=torch.float64)).float()


def released_config_yaml(cfg: SenseVoiceConfig) -> str:
    """A ``config.yaml`` shaped like the released SenseVoiceSmall one (sizes from ``cfg``)."""
    return f"""encoder: SenseVoiceEncoderSmall
encoder_conf:
    output_size: {cfg.output_size}
    attention_heads: {cfg.attention_heads}
    linear_units: {cfg.linear_units}
    num_blocks: {cfg.num_blocks}
    tp_blocks: {cfg.tp_blocks}
    dropout_rate: 0.1
    positional_dropout_rate: 0.1
    attention_dropout_rate: 0.1
    input_layer: pe
    pos_enc_class: SinusoidalPositionEncoder
    normalize_before: true
    kernel_size: 11
    sanm_shfit: 0
    selfattention_layer_type: sanm

model: SenseVoiceSmall
model_conf:
    length_normalized_loss: true
    sos: 1
    eos: 2
    ignore_id: -1

tokenizer: SentencepiecesTokenizer
tokenizer_conf:
  bpemodel: null
  unk_symbol: <unk>
  split_with_space: true

frontend: WavFrontend
frontend_conf:
    fs: 16000
    window: hamming
    n_mels: 80
    frame_length: 25
    frame_shift: 10
    lfr_m: 7
    lfr_n: 6
    cmvn_file: null
"""


def released_am_mvn(shift: np.ndarray, scale: np.ndarray) -> str:
    """``am.mvn`` text exactly as released (Kaldi nnet1: Splice, AddShift, Rescale on one line each)."""
    dim = shift.size
    row = lambda v: " ".join(f"{x:.6f}" for x in v)  # noqa: E731
    return (f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {row(shift)} ]\n"
            f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {row(scale)} ]\n</Nnet>\n")


def cmvn_values(dim: int = 560) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return np.round(-12 + 2 * rng.random(dim), 6), np.round(0.2 + 0.1 * rng.random(dim), 6)


def write_released_dir(directory, cfg: SenseVoiceConfig = SMALL, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random SenseVoiceSmall weights in the released layout: model.pt (with a CTC head), config.yaml,
    am.mvn, plus files a model repository carries that are not weights."""
    torch.manual_seed(seed)
    state = SenseVoiceSmall(cfg).state_dict()
    for key, value in state.items():  # make every tensor matter (LayerNorms away from 1/0)
        state[key] = torch.randn_like(value) * (0.3 if value.ndim == 1 else 1 / math.sqrt(value.shape[-1]))
    state["ctc.ctc_lo.weight"] = torch.randn(SMALL_CTC_VOCAB, cfg.output_size)
    state["ctc.ctc_lo.bias"] = torch.zeros(SMALL_CTC_VOCAB)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "model.pt")
    (directory / "config.yaml").write_text(released_config_yaml(cfg))
    (directory / "am.mvn").write_text(released_am_mvn(*cmvn_values(cfg.input_size)))
    (directory / "README.md").write_text("# SenseVoiceSmall\nnot a weight file\n")
    (directory / "tokens.json").write_text('["<blank>", "<s>"]')
    (directory / "chn_jpn_yue_eng_ko_spectok.bpe.model").write_bytes(b"\x00\x01sentencepiece")
    return state


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("SenseVoiceSmall")
    write_released_dir(directory)
    return directory


@pytest.fixture(scope="module")
def encoder(released_dir) -> SenseVoiceSpeechEncoder:
    return SenseVoiceSpeechEncoder.from_pretrained(released_dir)


# --- layout -----------------------------------------------------------------------------------

def test_full_size_module_has_the_released_keys_and_shapes():
    with torch.device("meta"):
        model = SenseVoiceSmall(SenseVoiceConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "embed.weight": (16, 560),
        "encoder.encoders0.0.self_attn.linear_q_k_v.weight": (1536, 560),
        "encoder.encoders0.0.self_attn.fsmn_block.weight": (512, 1, 11),
        "encoder.encoders0.0.norm1.weight": (560,),
        "encoder.encoders0.0.norm2.weight": (512,),
        "encoder.encoders.48.self_attn.linear_out.weight": (512, 512),
        "encoder.encoders.48.feed_forward.w_1.weight": (2048, 512),
        "encoder.tp_encoders.19.feed_forward.w_2.weight": (512, 2048),
        "encoder.after_norm.weight": (512,),
        "encoder.tp_norm.bias": (512,),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert "encoder.encoders.49.norm1.weight" not in shapes and "encoder.tp_encoders.20.norm1.weight" not in shapes
    # 221.1M without the CTC head; the released 234M include ctc.ctc_lo (25055 x 512 + bias)
    assert sum(math.prod(s) for s in shapes.values()) == 221_145_952


# --- front end --------------------------------------------------------------------------------

@pytest.mark.parametrize("num_samples", [400, 401, 560, 16_000, 37_921])
def test_fbank_fast_path_matches_plain_reference(num_samples):
    wave = speech_like(num_samples / SR + 1e-9, seed=num_samples)[:num_samples]
    assert wave.numel() == num_samples
    cfg = FrontendConfig()
    reference = fbank_reference(wave.numpy(), cfg)
    fast = fbank(wave, cfg)
    assert fast.shape == reference.shape == (1 + (num_samples - 400) // 160, 80)
    assert np.abs(fast.numpy() - reference).max() < 1e-5
    # the same maths in float32 differs only by rounding (log-mel values are ~5-25)
    assert np.abs(fbank(wave, cfg, dtype=torch.float32).double().numpy() - reference).max() < 1e-3


def test_lfr_fast_path_matches_plain_reference():
    g = torch.Generator().manual_seed(0)
    for frames in range(1, 30):
        feats = torch.randn(frames, 5, generator=g, dtype=torch.float64)
        fast, reference = lfr(feats), lfr_reference(feats.numpy())
        assert fast.shape == reference.shape == (math.ceil(frames / 6), 35)
        assert np.abs(fast.numpy() - reference).max() < 1e-5
    feats = fbank(speech_like(1.3))
    assert np.abs(lfr(feats).numpy() - lfr_reference(feats.numpy())).max() < 1e-5


def test_cmvn_is_read_from_the_released_am_mvn(encoder, released_dir, tmp_path):
    shift, scale = cmvn_values()
    cmvn = read_am_mvn(released_dir / "am.mvn", 560)
    assert torch.equal(cmvn, torch.tensor(np.stack([shift, scale]), dtype=torch.float32))
    wave = speech_like(0.9, seed=3)
    expected = (lfr(fbank(wave)) + torch.from_numpy(shift)) * torch.from_numpy(scale)
    assert torch.allclose(encoder.features([wave])[0], expected.float(), atol=1e-4)
    # written back in the same layout, read back unchanged
    assert torch.equal(read_am_mvn(write_am_mvn(tmp_path / "am.mvn", cmvn[0], cmvn[1])), cmvn)
    (tmp_path / "bad.mvn").write_text(released_am_mvn(shift[:80], scale[:80]))
    with pytest.raises(ValueError, match=r"AddShift 80, Rescale 80, expected 560") as err:
        read_am_mvn(tmp_path / "bad.mvn", 560)
    assert "\n" not in str(err.value)


# --- encoder ----------------------------------------------------------------------------------

def test_encoder_gives_one_512_style_frame_per_60_ms(encoder):
    seconds = [0.5, 1.0, 2.37]
    waves = [speech_like(s, seed=i) for i, s in enumerate(seconds)]
    out = encoder(waves)
    for wave, feats, s in zip(waves, out, seconds):
        lfr_frames = math.ceil((1 + (wave.numel() - 400) // 160) / 6)
        assert feats.shape == (NUM_QUERIES + lfr_frames, SMALL.output_size) == (encoder.num_frames(wave.numel()), 64)
        assert abs(lfr_frames - s / 0.06) <= 1  # 60 ms per frame
        assert torch.isfinite(feats).all() and feats.dtype == torch.float32 and not feats.requires_grad
    assert [f.shape[0] for f in out] == [12, 21, 44]
    # batching pads and masks: each clip encodes the same alone
    for wave, feats in zip(waves, out):
        assert torch.allclose(encoder([wave])[0], feats, atol=1e-5)
    # the 4 query frames can be stripped; the speech frames are unchanged
    stripped = SenseVoiceSpeechEncoder(encoder.model, encoder.cmvn, strip_queries=True)
    assert torch.allclose(stripped([waves[0]])[0], out[0][NUM_QUERIES:], atol=1e-6)
    assert stripped.num_frames(waves[0].numel()) == out[0].shape[0] - NUM_QUERIES
    with pytest.raises(ValueError, match="too short"):
        encoder([torch.zeros(399)])


def test_safetensors_weights_and_save_pretrained_round_trip(encoder, released_dir, tmp_path):
    wave = speech_like(0.7, seed=9)
    expected = encoder([wave])[0]
    state = torch.load(released_dir / "model.pt", weights_only=True)
    copy = tmp_path / "st"
    copy.mkdir()
    for name in ("config.yaml", "am.mvn"):
        (copy / name).write_text((released_dir / name).read_text())
    save_file(state, str(copy / "model.safetensors"))
    assert torch.equal(SenseVoiceSpeechEncoder.from_pretrained(copy)([wave])[0], expected)
    saved = encoder.save_pretrained(tmp_path / "saved")
    assert torch.equal(SenseVoiceSpeechEncoder.from_pretrained(saved)([wave])[0], expected)


def test_projector_trains_while_the_encoder_stays_frozen(encoder):
    projector = SpeechProjector(SMALL.output_size, 96)
    assert set(projector.state_dict()) == {"pre_proj_layernorm.weight", "pre_proj_layernorm.bias",
                                           "mlp.0.weight", "mlp.2.weight"}  # release: audio_projection.*
    feats = encoder([speech_like(0.6), speech_like(0.4, seed=1)])
    loss = sum(projector(f).pow(2).mean() for f in feats)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert not encoder.model.training
    assert all(not p.requires_grad and p.grad is None for p in encoder.model.parameters())
    full = SpeechProjector()
    assert full(torch.zeros(2, 7, 512)).shape == (2, 7, 3584)


# --- loading errors ---------------------------------------------------------------------------

def _one_line_error(directory, match):
    with pytest.raises(CheckpointMismatchError, match=match) as err:
        SenseVoiceSpeechEncoder.from_pretrained(directory)
    assert "\n" not in str(err.value)


def test_loading_errors_name_the_keys_on_one_line(tmp_path):
    state = write_released_dir(tmp_path / "a")
    del state["encoder.encoders.1.self_attn.fsmn_block.weight"]
    torch.save(state, tmp_path / "a" / "model.pt")
    _one_line_error(tmp_path / "a", r"missing keys \(1\): encoder\.encoders\.1\.self_attn\.fsmn_block\.weight")

    state = write_released_dir(tmp_path / "b")
    state["embed.weight"] = torch.zeros(16, 80)
    state["encoder.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "b" / "model.pt")
    _one_line_error(tmp_path / "b", r"unexpected keys \(1\): encoder\.extra\.weight; "
                                    r"shape mismatches \(1\): embed\.weight \(16, 80\) != \(16, 560\)")

    write_released_dir(tmp_path / "c")
    (tmp_path / "c" / "am.mvn").unlink()
    with pytest.raises(FileNotFoundError, match="am.mvn"):
        SenseVoiceSpeechEncoder.from_pretrained(tmp_path / "c")


class _NotATensor:
    pass


def test_model_pt_is_read_with_weights_only(tmp_path):
    state = write_released_dir(tmp_path / "d")
    torch.save({"state_dict": state, "trainer": _NotATensor()}, tmp_path / "d" / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        SenseVoiceSpeechEncoder.from_pretrained(tmp_path / "d")
