"""Shard format: writer layout, DALI index, listing errors, screening, validation, mixtures."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from omnidiff.data.streams.mixture import MixtureConfigError, load_mixture_config
from omnidiff.data.media.validation import (
    SampleLimits, SampleRejected, screen_sample, validate_shard)
from omnidiff.data.media.shards import SampleRecord, ShardError, ShardWriter, list_shards
from omnidiff.data.media.synthetic import (
    encode_audio, encode_image, smooth_image, tones, write_synthetic_shards)

RNG = np.random.default_rng(0)
JPG = encode_image(smooth_image(RNG, 40, 30), "jpg")
PNG = encode_image(smooth_image(RNG, 30, 40), "png")
WAV = encode_audio(tones(RNG, 16_000, 0.25), 16_000, "wav")
SPOKEN_VQA = [{"role": "system", "content": "Answer."},
              {"role": "user", "content": "<speech>\n<image>"},
              {"role": "assistant", "content": "Red.\n<speech>"}]
ASR = {"task": "asr", "messages": [{"role": "user", "content": "<speech>"}],
       "audios": ["audio0.wav"]}


def test_writer_layout_record_and_index(tmp_path):
    with ShardWriter(tmp_path / "part-%06d.tar", max_samples=2) as writer:
        writer.write("a", "captioning", [{"role": "user", "content": "What?\n<image>"},
                                         {"role": "assistant", "content": "A cat."}],
                     images=[("jpg", JPG)], source="unit")
        writer.write("b", "spoken_vqa", SPOKEN_VQA, images=[("png", PNG)],
                     audios=[("wav", WAV), ("wav", WAV)])
        writer.write("c", "text", [{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello"}])
    assert [p.name for p in writer.shards] == ["part-000000.tar", "part-000001.tar"]
    with tarfile.open(writer.shards[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert sorted(members) == ["a.image0.jpg", "a.json", "b.audio0.wav", "b.audio1.wav",
                               "b.image0.png", "b.json"]
    assert members["a.image0.jpg"] == JPG and members["b.audio1.wav"] == WAV
    record = json.loads(members["b.json"])
    assert record["images"] == ["image0.png"] and record["audios"] == ["audio0.wav", "audio1.wav"]
    assert json.loads(members["a.json"])["source"] == "unit"  # metadata kept
    assert SampleRecord.model_validate(record).media_roles("<speech>") == ["user", "assistant"]
    infos = list_shards(str(tmp_path / "part-{000000..000001}.tar"))
    assert [(i.num_samples, i.index_path.name) for i in infos] == [(2, "part-000000.idx"),
                                                                   (1, "part-000001.idx")]
    assert infos[0].index_path.read_text().startswith("v1.2 2\n")
    assert validate_shard(writer.shards[0]).rejections == []


def test_writer_refuses_inconsistent_samples(tmp_path):
    with ShardWriter(tmp_path / "p-%02d.tar") as writer:
        with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
            writer.write("a", "captioning", [{"role": "user", "content": "<image>"}])
        with pytest.raises(ValueError, match="extension 'bmp'"):
            writer.write("b", "captioning", [{"role": "user", "content": "<image>"}],
                         images=[("bmp", JPG)])
        writer.write("c", "text", [{"role": "user", "content": "x"}])
        with pytest.raises(ValueError, match="unique"):
            writer.write("c", "text", [{"role": "user", "content": "x"}])
        with pytest.raises(ValueError, match="without dots"):
            writer.write("d.e", "text", [{"role": "user", "content": "x"}])


def test_unreadable_shards_raise_one_clear_error(tmp_path):
    good = write_synthetic_shards(tmp_path / "good-%02d.tar", 3)[0]
    (tmp_path / "text.tar").write_text("not a tar archive at all\n" * 40)
    data = good.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.idx").write_text(good.with_suffix(".idx").read_text())  # index claims more
    with tarfile.open(good) as tar:  # cut exactly after a member: only the end marker is missing
        last = tar.getmembers()[2]
    (tmp_path / "clean_cut.tar").write_bytes(data[: last.offset_data + -(-last.size // 512) * 512])
    cases = {str(tmp_path / "missing.tar"): "no such file",
             str(tmp_path / "text.tar"): "not a readable tar archive",
             str(tmp_path / "cut.tar"): r"not a readable tar archive \(unexpected end of data\)",
             str(tmp_path / "clean_cut.tar"): r"truncated \(no end-of-archive marker",
             str(tmp_path / "none-*.tar"): "matches no file"}
    for spec, message in cases.items():
        with pytest.raises(ShardError, match=message) as info:
            list_shards([str(good), spec])
        assert spec in str(info.value) and "\n" not in str(info.value)


def _screen(record, images=(), audios=(), **limits):
    data = record.encode() if isinstance(record, str) else json.dumps(record).encode()
    return screen_sample(data, list(images) + [b""] * 2,
                         list(audios) + [b""] * 2, SampleLimits(**limits))


@pytest.mark.parametrize("record,images,audios,limits,reason,detail", [
    ("not json", (), (), {}, "bad_json", "not JSON"),
    ([1, 2], (), (), {}, "bad_json", "not an object"),
    ({"task": "asr"}, (), (), {}, "bad_record", "messages: Field required"),
    ({"task": "asr", "messages": [{"role": "robot", "content": "x"}]}, (), (), {}, "bad_record",
     "messages.0.role"),
    (ASR, (), (), {}, "missing_media", "audio0.wav"),
    (ASR, (), (b"RIFF" + bytes(40),), {}, "bad_audio", "audio0"),
    ({"task": "c", "messages": [{"role": "user", "content": "<image>"}], "images": ["image0.jpg"]},
     (b"\xff\xd8garbage",), (), {}, "bad_image", "image0"),
    (ASR, (), (WAV,), {"max_audio_seconds": 0.2}, "too_long", "0.2 s"),
    ({"task": "c", "messages": [{"role": "user", "content": "<image>"}], "images": ["image0.jpg"]},
     (JPG,), (), {"max_image_pixels": 1000}, "too_long", "40x30"),
    ({"task": "t", "messages": [{"role": "user", "content": "x" * 50}]}, (), (),
     {"max_text_chars": 49}, "too_long", "50 text characters"),
])
def test_screen_rejects_with_reason(record, images, audios, limits, reason, detail):
    with pytest.raises(SampleRejected) as info:
        _screen(record, images, audios, **limits)
    assert info.value.reason == reason and detail in info.value.detail


def test_screen_accepts_good_sample_in_placeholder_order():
    record = {"task": "spoken_vqa", "messages": SPOKEN_VQA, "images": ["image0.png"],
              "audios": ["audio0.wav", "audio1.wav"]}
    sample = _screen(record, [PNG], [WAV, WAV])
    assert sample.record.task == "spoken_vqa"
    assert sample.images == [PNG] and sample.audios == [WAV, WAV]


def test_validate_shard_finds_each_corrupted_sample(tmp_path):
    corrupt = {0: "truncated_image", 2: "garbage_audio", 3: "bad_json", 9: "missing_field"}
    shard = write_synthetic_shards(tmp_path / "p-%02d.tar", 12, samples_per_shard=12,
                                   corrupt=corrupt)[0]
    report = validate_shard(shard)
    assert report.num_samples == 12 and report.num_good == 8
    found = {int(r.key.removeprefix("sample")): r.reason for r in report.rejections}
    assert found == {0: "bad_image", 2: "bad_audio", 3: "bad_json", 9: "bad_record"}


def test_mixture_config(tmp_path):
    write_synthetic_shards(tmp_path / "a" / "part-%02d.tar", 6, samples_per_shard=3)
    path = tmp_path / "mixture.yaml"
    path.write_text("sources:\n  a: {shards: ['a/part-{00..01}.tar']}\n  b: {shards: ['b/*.tar']}\n"
                    "stages:\n  s1: {a: 3}\n  s2: {a: 3, b: 1, }\n")
    mixture = load_mixture_config(path)
    assert mixture.ratios("s2") == {"a": 0.75, "b": 0.25}
    assert [i.num_samples for i in mixture.shards("a")] == [3, 3]
    with pytest.raises(ShardError, match="matches no file"):
        mixture.shards("b")
    path.write_text("sources:\n  a: {shards: [x.tar]}\nstages:\n  s1: {a: 0, c: 1}\n")
    with pytest.raises(MixtureConfigError, match=r"stages.s1 names unknown sources \['c'\]"):
        load_mixture_config(path)
    path.write_text("sources:\n  a: {shards: [x.tar]}\nstages:\n  s1: {a: 0}\n")
    with pytest.raises(MixtureConfigError, match="no source with a positive ratio"):
        load_mixture_config(path)
