"""Media tokenizers: MAGVIT-v2 (full size, random init), GLM-4-Voice encoder (small random config),
the k-means demo tokenizers fitted to synthetic media, and the shared k-means / loading helpers."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from omnidiff.data.tokenizers import load_media_tokenizer, media_tokenizer_kinds
from omnidiff.data.tokenizers.checkpoint import CheckpointMismatchError
from omnidiff.data.tokenizers.demo_image import PatchKMeansImageTokenizer
from omnidiff.data.tokenizers.demo_speech import MelKMeansSpeechTokenizer
from omnidiff.data.tokenizers.glm4_voice import Glm4VoiceTokenizer, WhisperVQConfig, WhisperVQEncoder
from omnidiff.data.tokenizers.kmeans import fit_kmeans, inertia, nearest_centroid, nearest_centroid_reference
from omnidiff.data.tokenizers.magvit2 import LookupFreeQuantizer, MagvitV2, MagvitV2Config, MagvitV2Tokenizer
from transformers import WhisperFeatureExtractor

SR = 16_000


# --- synthetic media --------------------------------------------------------------------------

PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.9], [0.95, 0.85, 0.1],
                        [0.6, 0.2, 0.7], [0.1, 0.8, 0.8], [0.95, 0.95, 0.95], [0.1, 0.1, 0.1]]) * 2 - 1


def shape_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Discs and rectangles in palette colours on a palette background, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.empty(n, 3, size, size)
    for i in range(n):
        images[i] = PALETTE[torch.randint(len(PALETTE), (1,), generator=g)].view(3, 1, 1)
        for _ in range(3):
            cx, cy = (torch.rand(2, generator=g) * size).tolist()
            r = float(size / 8 + torch.rand(1, generator=g) * size / 4)
            disc = bool(torch.rand(1, generator=g) < 0.5)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2 if disc else ((xx - cx).abs() < r) & ((yy - cy).abs() < 0.6 * r)
            images[i][:, mask] = PALETTE[torch.randint(len(PALETTE), (1,), generator=g)].view(3, 1)
    return images


VOWELS = [(730, 1090), (270, 2290), (300, 870), (530, 1840), (660, 1720), (490, 1350)]


def speech_like(seconds: float, seed: int) -> torch.Tensor:
    """Vowel-like harmonic segments (gliding pitch, two formants), noise bursts and pauses."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < seconds * SR:
        n = int(rng.uniform(0.08, 0.35) * SR)
        t = np.arange(n) / SR
        kind = rng.choice(3, p=[0.6, 0.2, 0.2])
        if kind == 0:
            f0 = rng.uniform(90, 240) * (1 + rng.uniform(-0.3, 0.3) * t / t[-1])
            phase = 2 * np.pi * np.cumsum(f0) / SR
            f1, f2 = VOWELS[rng.integers(len(VOWELS))]
            seg = sum(
                (np.exp(-(((h * f0 - f1) / 120) ** 2)) + 0.6 * np.exp(-(((h * f0 - f2) / 180) ** 2)) + 0.02) * np.sin(h * phase)
                for h in range(1, 30)
            )
        elif kind == 1:
            spectrum = np.fft.rfft(rng.standard_normal(n))
            freqs = np.fft.rfftfreq(n, 1 / SR)
            low = rng.uniform(2000, 5000)
            seg = np.fft.irfft(spectrum * ((freqs > low) & (freqs < low + 2000)), n) * 3
        else:
            seg = 0.001 * rng.standard_normal(n)
        parts.append(seg * np.hanning(n) * 0.3)
        total += n
    return torch.from_numpy(np.concatenate(parts)[: int(seconds * SR)].astype(np.float32))


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (images - reference).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4.0 / mse)).mean())


def test_registry_lists_kinds_and_rejects_unknown(tmp_path):
    assert media_tokenizer_kinds() == ["glm4voice", "kmeans_image", "kmeans_speech", "magvitv2"]
    with pytest.raises(ValueError, match="unknown media tokenizer kind 'vqgan'"):
        load_media_tokenizer("vqgan", tmp_path)
    with pytest.raises(FileNotFoundError, match="magvitv2 tokenizer path not found"):
        load_media_tokenizer("magvitv2", tmp_path / "absent")


# --- MAGVIT-v2 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def magvit():
    """Full-size MAGVIT-v2 with random weights, one 256 px image and its codes."""
    torch.manual_seed(0)
    tokenizer = MagvitV2Tokenizer(MagvitV2())
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return tokenizer, image, tokenizer.encode(image)


def test_magvit_layout_matches_release(magvit):
    state = magvit[0].model.state_dict()
    expected = {  # shapes of the released showlab/magvitv2 checkpoint
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.3.conv2.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.3.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.down.4.block.3.norm2.weight": (512,),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (13, 512, 3, 3),
        "encoder.quant_conv.weight": (13, 13, 1, 1),
        "decoder.post_quant_conv.weight": (13, 13, 1, 1),
        "decoder.conv_in.weight": (512, 13, 3, 3),
        "decoder.up.4.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.up.0.block.3.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quantize.embedding": (8192, 13),
        "quantize.power_vals": (13,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    absent = ["encoder.down.4.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
              "decoder.up.4.block.3.conv1.weight", "encoder.down.1.block.3.conv1.weight"]
    assert not [k for k in absent if k in state]


def test_magvit_full_size_encodes_256px_to_16x16_and_decodes(magvit):
    tokenizer, _, codes = magvit
    assert (tokenizer.codebook_size, tokenizer.codes_per_image, tokenizer.downsample) == (8192, 256, 16)
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 8192 and codes.unique().numel() > 1
    image = tokenizer.decode(codes)
    assert image.shape == (1, 3, 256, 256) and image.abs().max() <= 1.0


def test_lfq_bits_agree_with_nearest_codebook_entry():
    lfq = LookupFreeQuantizer(13)
    z = torch.randn(2, 13, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lfq.codes(z), lfq.codes_reference(z))
    signs = -torch.ones(3, 13, 1, 1)
    signs[0, 0] = 1  # channel 0 is the most significant bit
    signs[1, 12] = 1
    signs[2] = 1
    assert lfq.codes(signs).flatten().tolist() == [4096, 1, 8191]
    assert torch.equal(lfq.latents(lfq.codes(signs)), signs)


def test_magvit_checkpoint_round_trip_gives_identical_codes(magvit, tmp_path):
    tokenizer, image, codes = magvit
    tokenizer.save_pretrained(tmp_path / "magvit")
    loaded = load_media_tokenizer("magvitv2", tmp_path / "magvit")
    assert torch.equal(loaded.encode(image), codes)


SMALL_MAGVIT = MagvitV2Config(ch=32, ch_mult=(1, 2), num_res_blocks=(1, 1), decoder_ch_mult=(1, 2),
                              decoder_num_res_blocks=(1, 1), z_channels=4, resolution=32)


def test_magvit_loads_wrapped_torch_pickle_file(tmp_path):
    tokenizer = MagvitV2Tokenizer(MagvitV2(SMALL_MAGVIT))
    tokenizer.save_pretrained(tmp_path)  # config.json beside the weights file
    torch.save({"state_dict": tokenizer.model.state_dict(), "step": 7}, tmp_path / "magvit.pt")
    (tmp_path / "model.safetensors").unlink()
    loaded = load_media_tokenizer("magvitv2", tmp_path / "magvit.pt")
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(image), tokenizer.encode(image))
    assert loaded.encode(image).shape == (2, 16, 16) and loaded.codebook_size == 16


def test_magvit_bad_checkpoint_names_the_keys(tmp_path):
    path = MagvitV2Tokenizer(MagvitV2(SMALL_MAGVIT)).save_pretrained(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    del state["decoder.conv_out.weight"]
    state["discriminator.head.weight"] = torch.zeros(1)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): decoder\.conv_out\.weight; "
                                                      r"unexpected keys \(1\): discriminator\.head\.weight"):
        load_media_tokenizer("magvitv2", path)


def test_magvit_rejects_bad_input():
    tokenizer = MagvitV2Tokenizer(MagvitV2(SMALL_MAGVIT))
    with pytest.raises(ValueError, match="multiples of 2"):
        tokenizer.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tokenizer.encode(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        tokenizer.decode(torch.full((1, 2, 2), 16))


# --- GLM-4-Voice ------------------------------------------------------------------------------

SMALL_GLM = WhisperVQConfig(num_mel_bins=80, d_model=64, encoder_attention_heads=4, encoder_ffn_dim=128,
                            encoder_layers=4, pooling_position=2, quantize_position=2)


@pytest.fixture(scope="module")
def glm():
    torch.manual_seed(0)
    encoder = WhisperVQEncoder(SMALL_GLM)
    return Glm4VoiceTokenizer(encoder, WhisperFeatureExtractor(feature_size=80))


def test_glm4_gives_12_5_codes_per_second(glm):
    waves = [speech_like(s, seed=i) for i, s in enumerate((1.0, 3.3, 31.0))]
    codes = glm.encode(waves)
    # ceil(12.5 * seconds); 31 s = one 30 s segment (375 codes) + 1 s (13 codes)
    assert [c.numel() for c in codes] == [13, 42, 388]
    assert all(c.dtype == torch.int64 and 0 <= int(c.min()) and int(c.max()) < 16384 for c in codes)
    assert glm.codes_per_second == 12.5 and glm.codebook_size == 16384
    assert torch.cat(codes).unique().numel() > 10


def test_glm4_round_trip_and_release_variants(glm, tmp_path):
    wave = speech_like(2.0, seed=5)
    expected = glm.encode([wave])[0]
    directory = glm.save_pretrained(tmp_path / "glm")
    assert torch.equal(load_media_tokenizer("glm4voice", directory).encode([wave])[0], expected)
    # the other layout in circulation: keys under "model.encoder.", plus the layers after the
    # quantiser, the final layer norm and the EMA buffers, none of which tokenisation uses
    state = load_file(str(directory / "model.safetensors"))
    state = {f"model.encoder.{k}": v for k, v in state.items()}
    state.update({"model.encoder.layers.3.fc1.bias": torch.zeros(128), "model.encoder.layer_norm.weight": torch.ones(64),
                  "model.encoder.ema_count": torch.ones(16384)})
    save_file(state, str(directory / "model.safetensors"))
    assert torch.equal(Glm4VoiceTokenizer.from_pretrained(directory).encode(wave[None])[0], expected)
    del state["model.encoder.codebook.weight"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): codebook\.weight"):
        load_media_tokenizer("glm4voice", directory)


def test_glm4_decode_is_not_implemented(glm):
    with pytest.raises(NotImplementedError, match="flow-matching decoder .* HiFT vocoder"):
        glm.decode([torch.zeros(5, dtype=torch.long)])


def test_glm4_config_keeps_release_defaults():
    cfg = WhisperVQConfig()
    assert (cfg.num_mel_bins, cfg.d_model, cfg.quantize_vocab_size, cfg.pooling_kernel_size) == (128, 1280, 16384, 4)
    assert cfg.samples_per_code == 1280


# --- k-means ----------------------------------------------------------------------------------

def test_nearest_centroid_matches_reference():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(5000, 24, generator=g), torch.randn(300, 24, generator=g)
    assert torch.equal(nearest_centroid(x, c), nearest_centroid_reference(x, c))


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(32, 16, generator=g) * 6
    x = means[torch.randint(32, (4000,), generator=g)] + 0.2 * torch.randn(4000, 16, generator=g)
    centroids = fit_kmeans(x, 32, seed=0)
    assert nearest_centroid(means, centroids).unique().numel() == 32
    assert inertia(x, centroids) < 1.2 * 16 * 0.2**2
    assert torch.equal(centroids, fit_kmeans(x, 32, seed=0))


def test_kmeans_inertia_close_to_scikit_learn():
    cluster = pytest.importorskip("sklearn.cluster")
    x = torch.randn(3000, 48, generator=torch.Generator().manual_seed(1))
    reference = cluster.KMeans(128, n_init=1, random_state=0).fit(x.numpy()).inertia_ / len(x)
    assert inertia(x, fit_kmeans(x, 128, seed=0)) < 1.05 * reference


# --- demo tokenizers --------------------------------------------------------------------------

def test_patch_kmeans_beats_mean_colour_and_round_trips(tmp_path):
    train, test = shape_images(64, 64, seed=0), shape_images(16, 64, seed=1)
    tokenizer = PatchKMeansImageTokenizer.fit(train, codebook_size=256, seed=0, patch_size=8)
    codes = tokenizer.encode(test)
    assert codes.shape == (16, 8, 8) and tokenizer.codes_per_image == 64
    recon = tokenizer.decode(codes)
    baseline = test.mean(dim=(2, 3), keepdim=True).expand_as(test)
    assert psnr(recon, test) > psnr(baseline, test) + 6.0
    loaded = load_media_tokenizer("kmeans_image", tokenizer.save(tmp_path / "image.safetensors"))
    assert torch.equal(loaded.encode(test), codes)
    with pytest.raises(ValueError, match="not a kmeans_speech tokenizer file"):
        load_media_tokenizer("kmeans_speech", tmp_path / "image.safetensors")
    with pytest.raises(ValueError, match=r"codebook size must be in \[1, 8192\]"):
        PatchKMeansImageTokenizer.fit(train, codebook_size=8193, seed=0)


def _mel_errors(tokenizer: MelKMeansSpeechTokenizer, wave: torch.Tensor) -> tuple[float, float, float]:
    """(quantised, resynthesised, constant-frame baseline) mean squared log-mel errors."""
    codes = tokenizer.encode([wave])[0]
    target = tokenizer.code_frames(wave).reshape(-1, tokenizer.config.n_mels)
    quantised = tokenizer.decode_log_mel(codes)
    resynth = tokenizer.decode([codes])[0]
    assert resynth.numel() == 1280 * codes.numel()
    reanalysed = tokenizer.code_frames(resynth).reshape(-1, tokenizer.config.n_mels)
    baseline = target.mean(0, keepdim=True)
    return tuple(float((a - target).pow(2).mean()) for a in (quantised, reanalysed, baseline))


def test_mel_kmeans_beats_constant_frame_and_round_trips(tmp_path):
    train = [speech_like(30.0, seed=s) for s in (10, 11)]
    tokenizer = MelKMeansSpeechTokenizer.fit(train, codebook_size=128, seed=0)
    wave = speech_like(4.1, seed=12)
    codes = tokenizer.encode([wave])[0]
    assert codes.numel() == math.ceil(4.1 * 12.5) == 52 and int(codes.max()) < 128
    quantised, resynth, baseline = _mel_errors(tokenizer, wave)
    assert quantised < 0.3 * baseline and resynth < 0.5 * baseline
    loaded = load_media_tokenizer("kmeans_speech", tokenizer.save(tmp_path / "speech.safetensors"))
    assert torch.equal(loaded.encode(wave[None])[0], codes)
    with pytest.raises(ValueError, match=r"codebook size must be in \[1, 16384\]"):
        MelKMeansSpeechTokenizer.fit(train, codebook_size=16385, seed=0)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_mel_kmeans_on_espeak_speech(tmp_path):
    sentences = ["The quick brown fox jumps over the lazy dog.", "Please open the window and let in some air.",
                 "Seven hundred people attended the concert last night.", "Where did you put the keys to the car?",
                 "My favourite colours are blue, green and orange.", "The museum is closed on Monday for cleaning."]
    waves = []
    for i, text in enumerate(sentences + ["Hello world, this is a test of the speech tokenizer."]):
        path = tmp_path / f"{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
        waves.append(_read_16k(path))
    tokenizer = MelKMeansSpeechTokenizer.fit(waves[:-1], codebook_size=128, seed=0)
    quantised, resynth, baseline = _mel_errors(tokenizer, waves[-1])
    assert quantised < 0.3 * baseline and resynth < 0.5 * baseline


def _read_16k(path) -> torch.Tensor:
    soundfile = pytest.importorskip("soundfile")
    data, rate = soundfile.read(str(path), dtype="float32")
    wave = torch.from_numpy(data if data.ndim == 1 else data.mean(1))
    n = round(wave.numel() * SR / rate)
    return torch.nn.functional.interpolate(wave[None, None], size=n, mode="linear", align_corners=False)[0, 0]
