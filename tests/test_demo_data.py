"""The demo dataset: a small build gives readable shards for every task, real images and speech."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnidiff.data.demo import scenes
from omnidiff.data.demo.build import STAGE_RATIOS, build_demo_dataset
from omnidiff.data.demo.speech import LIBRARY_DIR, SpeechError, WordLibrarySynthesizer, words_of
from omnidiff.data.demo.tasks import speech_vocabulary
from omnidiff.data.streams.mixture import load_mixture_config
from omnidiff.data.tokens.sequences import SequenceBuilder
from omnidiff.data.tokens.text import ByteTokenizer
from omnidiff.data.tokens.vocab import UnifiedVocab
from omnidiff.platform.cli import CommandError
from omnidiff.platform.commands import demo_data

ALL_TASKS = {"captioning", "vqa", "text_to_image", "asr", "tts", "speech_to_image", "spoken_vqa",
             "text"}
MEDIA_PER_TASK = {  # (images, audios) each task's sample must carry
    "captioning": (1, 0), "vqa": (1, 0), "text_to_image": (1, 0), "asr": (0, 1), "tts": (0, 1),
    "speech_to_image": (1, 1), "spoken_vqa": (1, 2), "text": (0, 0)}


def run_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    demo_data.register(parser)
    args = parser.parse_args(list(argv))
    return args.run(args)


def read_samples(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard, as ``{key: {member suffix: bytes}}`` (plain tarfile)."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                samples[key][suffix] = tar.extractfile(member).read()
    return dict(samples)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    assert run_command(str(out), "--samples", "40", "--image-size", "64", "--shard-size", "3",
                       "--speech", "library", "--workers", "1", "--quiet") == 0
    return out


def test_small_build_covers_every_task_with_real_media(small_build):
    samples = read_samples(small_build)
    tasks = defaultdict(int)
    for key, members in samples.items():
        record = json.loads(members["json"])
        task = record["task"]
        tasks[task] += 1
        assert key.startswith(task)
        assert (len(record["images"]), len(record["audios"])) == MEDIA_PER_TASK[task], key
        for name in record["images"]:
            image = Image.open(io.BytesIO(members[name]))
            image.load()
            assert image.mode == "RGB" and image.size == (64, 64)
            assert np.asarray(image).std() > 5, f"{key}: blank image"
        for name in record["audios"]:
            audio, rate = sf.read(io.BytesIO(members[name]))
            assert rate == 16_000 and audio.ndim == 1, key
            assert 0.3 < len(audio) / rate < 15
            assert np.sqrt(np.mean(audio ** 2)) > 0.02, f"{key}: silent audio"
    assert set(tasks) == ALL_TASKS
    assert sum(tasks.values()) == 40


def test_records_become_token_sequences(small_build):
    """Every record's placeholders match its media: the sequence builder accepts all of them."""
    tokenizer = ByteTokenizer()
    builder = SequenceBuilder(UnifiedVocab.from_text_tokenizer(tokenizer, 64, 64), tokenizer)
    for members in read_samples(small_build).values():
        record = json.loads(members["json"])
        sample = builder.build_from_messages(
            record["messages"], [[1, 2]] * len(record["images"]), [[3]] * len(record["audios"]),
            task=record["task"])
        assert sample.target_mask.any() and not sample.target_mask.all()


def test_mixture_yaml_lists_shards_and_three_stages(small_build):
    mixture = load_mixture_config(small_build / "mixture.yaml")
    assert set(mixture.sources) == ALL_TASKS
    shards = {info.path.name for task in ALL_TASKS for info in mixture.shards(task)}
    assert shards == {p.name for p in small_build.glob("*.tar")}
    captioning = mixture.shards("captioning")
    assert [info.num_samples for info in captioning] == [3, 3]  # 40 x 0.16 = 6, 3 per shard
    stage1, stage2, stage3 = (set(mixture.ratios(s)) for s in ("stage1", "stage2", "stage3"))
    assert stage1 == {"text_to_image", "captioning", "vqa", "text"}
    assert stage2 == stage1 | {"asr", "tts"}
    assert {"spoken_vqa", "speech_to_image"} <= stage3 and stage1 <= stage3
    assert mixture.ratios("stage3") == pytest.approx(STAGE_RATIOS["stage3"])


def test_build_is_deterministic_and_parallel_equals_serial(tmp_path, small_build):
    build_demo_dataset(tmp_path / "again", 40, speech="library", image_size=64, shard_size=3,
                       workers=2, progress=False)
    assert read_samples(tmp_path / "again") == read_samples(small_build)
    build_demo_dataset(tmp_path / "other", 40, seed=1, speech="library", image_size=64,
                       shard_size=3, workers=1, progress=False)
    assert read_samples(tmp_path / "other") != read_samples(small_build)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_backend_makes_speech(tmp_path):
    summary = build_demo_dataset(tmp_path, 8, speech="espeak", image_size=32, workers=1,
                                 progress=False)
    assert summary.speech_backend == "espeak-ng"
    members = read_samples(tmp_path)["spoken_vqa-000000"]
    audio, rate = sf.read(io.BytesIO(members["audio0.flac"]))
    assert rate == 16_000 and np.sqrt(np.mean(audio ** 2)) > 0.02


def test_word_library_says_every_spoken_word():
    library = WordLibrarySynthesizer()
    assert speech_vocabulary() <= set(library.words)
    assert sum(p.stat().st_size for p in LIBRARY_DIR.glob("*.wav")) < 2_000_000
    for word, audio in library.words.items():
        assert len(audio) > 0.1 * 16_000 and np.abs(audio).max() > 0.1, word
    assert words_of("The red, circle!") == ["the", "red", "circle"]
    with pytest.raises(SpeechError, match="zebra"):
        library("a zebra", np.random.default_rng(0))


def test_command_refuses_a_non_empty_folder(tmp_path, small_build):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CommandError, match="not empty"):
        run_command(str(tmp_path), "--samples", "8")
    with pytest.raises(CommandError, match="pass --overwrite"):
        run_command(str(small_build), "--samples", "8")
    with pytest.raises(CommandError, match="at least 8"):
        run_command(str(tmp_path / "new"), "--samples", "3")


def test_fitted_text_tokenizer_round_trips_every_demo_text_in_fewer_tokens(small_build, tmp_path):
    from omnidiff.data.tokenizers.demo_text import fit_text_tokenizer, shard_texts
    from omnidiff.data.tokens.text import HFTextTokenizer

    texts = list(shard_texts(sorted(small_build.glob("*.tar")), 10_000))
    assert len(texts) >= 80  # every sample has a user and an assistant turn
    tokenizer = HFTextTokenizer(fit_text_tokenizer(texts, tmp_path / "text", 400))
    assert len(tokenizer) <= 400
    byte_total = token_total = 0
    for text in [*texts, "never seen: Zürich ✓ 42"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        byte_total, token_total = byte_total + len(text.encode()), token_total + len(ids)
    assert token_total < 0.6 * byte_total
    vocab = UnifiedVocab.from_text_tokenizer(tokenizer, 16, 16)  # the chat specials are there
    chat = SequenceBuilder(vocab, tokenizer).chat([("Which shape is red?", "a circle.")])
    assert "a circle." in tokenizer.decode(chat.tokens[chat.target_mask].tolist())


def test_scene_captions_parse_back_to_their_scene_and_other_text_does_not():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = scenes.random_scene(rng)
        assert scenes.parse_caption(scene.caption) == scene
        assert scenes.parse_caption(scene.caption.capitalize() + ".") == scene
    assert scenes.parse_caption("red circle") == scenes.Scene((scenes.Item("red", "circle"),))
    for text in ("a cup of coffee on a red saucer", "a red circle next to a blue square", ""):
        assert scenes.parse_caption(text) is None


def test_the_colour_a_rendered_scene_shows_most_is_one_of_its_caption():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = scenes.random_scene(rng)
        shown = scenes.image_colors(np.asarray(scenes.render_scene(scene, rng, 32)))
        assert shown.most_common(1)[0][0] in {item.color for item in scene.items}, scene.caption
        if len(scene.items) == 2:  # both shapes are seen
            assert all(shown[item.color] > 0 for item in scene.items), scene.caption
    background = np.full((8, 8, 3), scenes.BACKGROUNDS[0], dtype=np.uint8)
    assert not scenes.image_colors(background)
