"""The evaluation library on an oracle model (it knows the held-out answers, and can be told to be
wrong by one token on chosen tasks), so every metric has a hand-known value; plus one real model."""

from __future__ import annotations

import json

import pytest
import soundfile
import torch
from PIL import Image

from omnidiff.data.demo.scenes import BACKGROUNDS, COLORS, caption_attributes
from omnidiff.data.tokenizers.demo_image import PatchKMeansConfig, PatchKMeansImageTokenizer
from omnidiff.data.tokenizers.demo_speech import MelKMeansSpeechTokenizer
from omnidiff.data.tokens.sequences import SequenceBuilder
from omnidiff.data.tokens.text import ByteTokenizer
from omnidiff.data.tokens.vocab import UnifiedVocab
from omnidiff.platform.config import ModelConfig
from omnidiff.platform.evaluation import PSNR_CEILING, EvalConfig, evaluate, save_artifacts
from omnidiff.platform.hf_convert import hf_config_from
from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion
from omnidiff.platform.sampling import SamplerConfig, hf_logits_fn

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZER = ByteTokenizer()
VOCAB = UnifiedVocab.from_text_tokenizer(TOKENIZER, speech_codebook_size=16, image_codebook_size=16)
BUILDER = SequenceBuilder(VOCAB, TOKENIZER)
ROWS = VOCAB.padded_size()
CONFIG = EvalConfig(sampler=SamplerConfig(steps=4), image_sampler=SamplerConfig(steps=4),
                    batch_size=3)  # greedy images too: an oracle's answers are then exact


def _held_out():
    return [
        BUILDER.captioning("Describe the image.", "red circle", [1, 2, 3, 4]),
        BUILDER.captioning("Describe the image.", "green star", [4, 3, 2, 1]),
        BUILDER.asr("blue moon", [5, 6, 7]),
        BUILDER.text_to_image("a red moon", [3, 1, 4, 1]),  # not a demo scene's caption
        BUILDER.tts("blue star", [8, 9, 10]),
    ]


class Oracle:
    """``logits_fn`` that recognises a row by its tokens before the first mask and predicts the
    known sequence (then end-of-text pads; only pads for rows it does not know); one token id
    too high on ``wrong`` tasks."""

    def __init__(self, samples, wrong: tuple[str, ...] = (), extra=()) -> None:
        self.known = [(s.tokens, s.task in wrong) for s in [*samples, *extra]]

    def __call__(self, ids, positions, segments):
        logits = torch.zeros(*ids.shape, ROWS)
        for r in range(ids.shape[0]):
            row = ids[r][segments[r] > 0]
            masks = (row == VOCAB.mask_id).nonzero()
            cut = int(masks[0, 0]) if len(masks) else len(row)
            known, wrong = next(((k, w) for k, w in self.known
                                 if len(k) >= cut and torch.equal(k[:cut], row[:cut])),
                                (torch.full((1,), VOCAB.eos_id), False))  # unknown: say nothing
            ahead = torch.cat([known, torch.full((len(row) + 1,), VOCAB.eos_id)])[1:len(row) + 1]
            logits[r, torch.arange(len(row)), (ahead + int(wrong)).clamp(max=ROWS - 1)] = 10.0
        return logits


@pytest.fixture(scope="module")
def tokenizers():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    image = PatchKMeansImageTokenizer.fit(images, 16, seed=0, patch_size=4, epochs=2)
    noise = [torch.randn(16_000, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(2)]
    speech = MelKMeansSpeechTokenizer.fit(noise, 16, seed=0, epochs=2, griffin_lim_iters=2)
    return image, speech


def _evaluate(model, tokenizers, samples=None, config=CONFIG):
    image, speech = tokenizers
    return evaluate(model, samples or _held_out(), VOCAB, TOKENIZER, image_tokenizer=image,
                    speech_tokenizer=speech, config=config)


def test_a_perfect_model_scores_perfectly_and_leaves_artefacts(tokenizers, tmp_path):
    transcript = BUILDER.asr("blue star", [8, 9, 10])  # what the model hears in its own speech
    report = _evaluate(Oracle(_held_out(), extra=[transcript]), tokenizers)
    assert report.metrics == {
        "masked_accuracy": 1.0, "captioning/masked_accuracy": 1.0, "asr/masked_accuracy": 1.0,
        "text_to_image/masked_accuracy": 1.0, "tts/masked_accuracy": 1.0,
        "captioning/exact_match": 1.0, "captioning/wer": 0.0,
        "captioning/color_accuracy": 1.0, "captioning/shape_accuracy": 1.0,
        "asr/exact_match": 1.0, "asr/wer": 0.0,
        "text_to_image/code_accuracy": 1.0, "text_to_image/psnr": PSNR_CEILING,
        "tts/roundtrip_wer": 0.0,
        # each caption with the other's image: the oracle describes the image it is shown, so
        # it is right only where the two captions agree (1 of the 8 masked positions)
        "captioning/masked_accuracy_blind": 0.125, "captioning/input_gain": 0.875,
    }
    written = save_artifacts(report, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == report.metrics
    grid = Image.open(tmp_path / "images" / "text_to_image_grid.png")
    assert grid.size == (128 + 2 + 128, 128)  # generated | reference, one row, 8 px x 16
    wave, rate = soundfile.read(tmp_path / "audio" / "tts_0.wav")
    assert rate == 16_000 and len(wave) == 3 * 1280
    assert len(written) == 3


def test_metrics_are_per_task(tokenizers):
    report = _evaluate(Oracle(_held_out(), wrong=("asr", "text_to_image", "tts")), tokenizers)
    metrics = report.metrics
    assert metrics["captioning/masked_accuracy"] == 1.0 and metrics["asr/masked_accuracy"] == 0.0
    assert metrics["captioning/exact_match"] == 1.0 and metrics["captioning/wer"] == 0.0
    assert metrics["asr/exact_match"] == 0.0 and metrics["asr/wer"] > 0
    assert metrics["text_to_image/code_accuracy"] == 0.0
    assert metrics["text_to_image/psnr"] < PSNR_CEILING
    assert metrics["tts/roundtrip_wer"] == 1.0  # speech no one can transcribe
    assert 0.0 < metrics["masked_accuracy"] < 1.0


def test_captions_are_scored_on_the_scene_colour_and_shape_they_name(tokenizers):
    """An oracle that knows the image of "red circle" as "green circle": colour wrong in 1 of 2
    captions, shape right in both; a caption naming neither counts in neither."""
    held_out = [*_held_out()[:2], BUILDER.captioning("Describe the image.", "a photo", [2, 2, 1, 1])]
    told = [BUILDER.captioning("Describe the image.", "green circle", [1, 2, 3, 4]), *held_out[1:]]
    metrics = _evaluate(Oracle(told), tokenizers, held_out).metrics
    assert metrics["captioning/color_accuracy"] == 0.5
    assert metrics["captioning/shape_accuracy"] == 1.0
    assert metrics["captioning/exact_match"] == pytest.approx(2 / 3)


def _solid_patches() -> PatchKMeansImageTokenizer:
    """Codes 1, 2, 3 decode to red, green and blue 4-pixel patches, the rest to background."""
    colors = [BACKGROUNDS[0]] * 16
    colors[1:4] = COLORS["red"], COLORS["green"], COLORS["blue"]
    centroids = (torch.tensor(colors, dtype=torch.float32) / 127.5 - 1).repeat_interleave(16, 1)
    return PatchKMeansImageTokenizer(PatchKMeansConfig(4, 8, 16), centroids)


def test_text_to_image_is_scored_on_the_colours_it_draws(tokenizers):
    """The oracle draws the red circle green and the blue star blue; the photo's prompt is no
    scene and counts in neither. Against the other scene's caption (blind) both miss."""
    held_out = [BUILDER.text_to_image("a red circle", [0, 1, 0, 0]),
                BUILDER.text_to_image("a large blue star", [3, 3, 0, 3]),
                BUILDER.text_to_image("a cup of coffee", [2, 0, 0, 0])]
    told = [BUILDER.text_to_image("a red circle", [0, 2, 0, 0]), *held_out[1:]]
    metrics = _evaluate(Oracle(told), (_solid_patches(), tokenizers[1]), held_out).metrics
    assert metrics["text_to_image/color_accuracy"] == 0.5
    assert metrics["text_to_image/color_accuracy_reference"] == 1.0
    assert metrics["text_to_image/color_accuracy_blind"] == 0.0


def test_images_are_sampled_with_the_image_sampler(tokenizers):
    """A near-uniform image sampler (temperature 100) misses the oracle's image codes while text
    answers, sampled greedily, stay exact."""
    hot = CONFIG.model_copy(update={"image_sampler": SamplerConfig(steps=4, temperature=100.0)})
    metrics = _evaluate(Oracle(_held_out()), tokenizers, config=hot).metrics
    assert metrics["text_to_image/code_accuracy"] < 0.5
    assert metrics["captioning/exact_match"] == 1.0


def test_caption_attributes_are_the_first_colour_and_shape_word():
    assert caption_attributes("A large red star to the left of a blue square.") == {
        "color": "red", "shape": "star"}
    assert caption_attributes("The star.") == {"shape": "star"}
    assert caption_attributes("A smiling astronaut.") == {}


def test_a_real_model_runs_every_metric(tokenizers):
    model_cfg = ModelConfig(preset="custom", hidden_size=32, num_layers=1, num_attention_heads=2,
                            num_query_groups=1, ffn_hidden_size=64, rope_theta=10_000.0)
    torch.manual_seed(0)
    model = OmniDiffusionForMaskedDiffusion(hf_config_from(
        model_cfg, ROWS, mask_token_id=VOCAB.mask_id, pad_token_id=VOCAB.eos_id)).eval()
    report = _evaluate(hf_logits_fn(model), tokenizers)
    assert set(report.metrics) == set(_evaluate(Oracle(_held_out(), extra=[
        BUILDER.asr("blue star", [8, 9, 10])]), tokenizers).metrics)
    assert all(0.0 <= report.metrics[k] <= 1.0 for k in report.metrics if "accuracy" in k)
