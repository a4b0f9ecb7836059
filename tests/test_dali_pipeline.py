"""DALI media pipelines against the PIL / soundfile / SciPy references; resume; bad input; sharding.

Tolerances (stated once, measured on this data with margin):
- images in [-1, 1]: max |DALI - PIL| <= 2 grey levels (2 / 127.5), mean <= 0.5 level; both round
  to 8 bits at different points, nothing more.
- waveforms at 16 kHz: max |DALI - resample_poly| <= 2e-3 away from the first/last 2 ms (32
  samples: DALI's 16-lobe sinc at 8 kHz input; the resamplers treat the boundary differently).
- log-mel of the same waveform: <= 0.01 dB on bins within 60 dB of the peak, <= 0.25 dB anywhere
  (float32 FFT vs float64 on near-silent bins).
"""

from __future__ import annotations

import logging
import pickle
import tarfile

import numpy as np
import pytest
import torch

from omnidiff.data.media import dali_reference as reference
from omnidiff.data.media.dali import DecodeStage, image_pipeline
from omnidiff.data.media.reader import MediaReader, MediaReaderConfig, MediaReaderError
from omnidiff.data.media.shards import IMAGE_PLACEHOLDER, ShardError
from omnidiff.data.media.synthetic import encode_image, smooth_image, write_synthetic_shards

SIZE, GENERATED_SIZE, RATE = 64, 48, 16_000
IMAGE_SIZES = ((96, 64), (64, 96), (131, 200), (333, 250), (50, 37), (257, 511))
AUDIO_RATES = (8_000, 16_000, 22_050, 44_100, 48_000)
NUM_SAMPLES = 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("media") / "part-%02d.tar", NUM_SAMPLES,
                                  samples_per_shard=15, image_sizes=IMAGE_SIZES,
                                  audio_rates=AUDIO_RATES, audio_seconds=0.3)


def _members(shards) -> dict[str, bytes]:
    members = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar}
    return members


def _reader(shards, state=None, **options) -> MediaReader:
    options = {"batch_size": 4, "image_size": SIZE, "generated_image_size": GENERATED_SIZE,
               "device": "cpu", **options}
    return MediaReader(MediaReaderConfig(shards=[str(s) for s in shards], **options), state=state)


def _epoch(reader: MediaReader) -> list:
    samples = []
    while reader.samples_read < reader.epoch_size:
        samples += next(reader).samples
    return samples


def test_images_match_pil_reference(shards):
    members, seen = _members(shards), set()
    for sample in _epoch(_reader(shards, shuffle=False)):
        roles = sample.record.media_roles(IMAGE_PLACEHOLDER)
        for name, image, role in zip(sample.record.images, sample.images, roles, strict=True):
            size = GENERATED_SIZE if role == "assistant" else SIZE
            expected = reference.image_to_model_input(
                reference.decode_image(members[f"{sample.key}.{name}"]), size)
            assert image.shape == (3, size, size) and image.dtype == torch.float32
            error = np.abs(image.numpy() - expected) * 127.5
            assert error.max() <= 2.0 and error.mean() <= 0.5, (sample.key, name)
            seen.add((name.split(".")[1], size))
    assert {ext for ext, _ in seen} == {"jpg", "png", "webp"} and {s for _, s in seen} == {
        SIZE, GENERATED_SIZE}


def test_audio_and_mels_match_soundfile_scipy_reference(shards):
    members, count = _members(shards), 0
    for sample in _epoch(_reader(shards, shuffle=False)):
        for name, wave, mel in zip(sample.record.audios, sample.audios, sample.mels, strict=True):
            expected = reference.audio_to_model_input(members[f"{sample.key}.{name}"], RATE)
            assert wave.shape == expected.shape
            assert np.abs(wave.numpy() - expected)[32:-32].max() <= 2e-3, (sample.key, name)
            wave_mel = reference.log_mel(wave.numpy(), RATE, 80, 400, 160)
            assert mel.shape == (80, 1 + len(wave) // 160)
            error = np.abs(mel.numpy() - wave_mel)
            assert error[wave_mel > wave_mel.max() - 60].max() <= 0.01 and error.max() <= 0.25
            count += 1
    assert count >= 20


def _batches(reader, n):
    return [[(s.key, [t.clone() for t in s.images + s.audios + s.mels])
             for s in next(reader).samples] for _ in range(n)]


def test_restored_reader_yields_exactly_the_same_batches(shards):
    original = _reader(shards, shuffle=True, shuffle_buffer=16, seed=3)
    first = _batches(original, 8)  # 32 of 40 samples: the resumed part crosses the epoch end
    state = pickle.loads(pickle.dumps(original.state_dict()))
    expected = _batches(original, 5)
    resumed = _reader(shards, state=state, shuffle=True, shuffle_buffer=16, seed=3)
    got = _batches(resumed, 5)
    assert [[k for k, _ in b] for b in got] == [[k for k, _ in b] for b in expected]
    for batch, reference_batch in zip(got, expected):
        for (_, tensors), (_, ref_tensors) in zip(batch, reference_batch):
            assert all(torch.equal(a, b) for a, b in zip(tensors, ref_tensors, strict=True))
    assert resumed.metrics() == original.metrics()
    fresh = _reader(shards, shuffle=True, shuffle_buffer=16, seed=3)
    # same seed, same start; and the resumed batches are not simply the first ones again
    assert [k for k, _ in _batches(fresh, 1)[0]] == [k for k, _ in first[0]]
    assert [k for k, _ in first[0]] != [k for k, _ in expected[0]]
    with pytest.raises(MediaReaderError, match="different seed"):
        _reader(shards, shuffle=True, shuffle_buffer=16, seed=4).load_state_dict(state)


def test_data_parallel_ranks_split_each_epoch(shards):
    keys = [[s.key for s in _epoch(MediaReader(MediaReaderConfig(
        shards=[str(s) for s in shards], batch_size=5, image_size=16, generated_image_size=16,
        device="cpu"), shard_id=rank, num_shards=4))] for rank in range(4)]
    assert sum(len(k) for k in keys) == NUM_SAMPLES
    assert len(set().union(*keys)) == NUM_SAMPLES


def test_five_percent_corruption_is_skipped_counted_and_logged(tmp_path, caplog):
    # layouts rotate with index % 5: 0 captioning, 1 text_to_image, 2 asr, 3 tts, 4 spoken_vqa
    corrupt = {5: "truncated_image", 41: "truncated_image", 12: "garbage_audio",
               73: "garbage_audio", 24: "bad_json", 100: "bad_json", 66: "missing_field",
               158: "missing_field"}
    shards = write_synthetic_shards(tmp_path / "p-%02d.tar", 160, samples_per_shard=40,
                                    corrupt=corrupt, image_sizes=((40, 32),), audio_seconds=0.1)
    reader = _reader(shards, batch_size=16, image_size=16, generated_image_size=16,
                     shuffle=True, shuffle_buffer=64)
    with caplog.at_level(logging.WARNING, logger="omnidiff.data.media.reader"):
        good = {s.key for s in _epoch(reader)}
    bad = {f"sample{i:07d}" for i in corrupt}
    assert reader.samples_read == 160 and len(good) == 152 and not good & bad
    metrics = reader.metrics()
    assert metrics["skipped_total"] == len(corrupt) == 8
    assert {k: v for k, v in metrics.items() if k.startswith("skipped/") and v} == {
        "skipped/bad_image": 2, "skipped/bad_audio": 2, "skipped/bad_json": 2,
        "skipped/bad_record": 2}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 8
    for index in corrupt:
        shard = shards[index // 40]
        assert any(f"sample{index:07d} in shard {shard}" in line for line in logged)


def test_decode_stage_isolates_bad_items_in_order():
    rng = np.random.default_rng(1)
    good = [encode_image(smooth_image(rng, 40, 30), "jpg") for _ in range(5)]
    bad = [good[0][:300], b"\xff\xd8 not a jpeg", good[1][:-900]]
    items = [good[0], bad[0], bad[1], good[1], good[2], good[3], bad[2], good[4]]
    stage = DecodeStage(lambda: image_pipeline(8, None), torch.device("cpu"))
    sizes = [np.float32(16)] * len(items)
    results = stage.run({"encoded": [np.frombuffer(x, np.uint8) for x in items], "size": sizes})
    assert [isinstance(r, str) for r in results] == [False, True, True, False, False, False, True,
                                                     False]
    clean = stage.run({"encoded": [np.frombuffer(x, np.uint8) for x in good], "size": sizes[:5]})
    decoded = [r[0] for r in results if not isinstance(r, str)]
    assert all(torch.equal(a, b[0]) for a, b in zip(decoded, clean, strict=True))


def test_unreadable_or_all_bad_shards_fail_clearly(tmp_path):
    missing = tmp_path / "missing.tar"
    with pytest.raises(ShardError, match=f"shard {missing}: no such file"):
        _reader([missing])
    all_bad = write_synthetic_shards(tmp_path / "bad-%02d.tar", 6,
                                     corrupt={i: "bad_json" for i in range(6)})
    with pytest.raises(MediaReaderError, match="no valid sample among 6 consecutive samples"):
        next(_reader(all_bad, batch_size=2))


@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu(shards):
    cpu = _epoch(_reader(shards, shuffle=False))
    gpu = _epoch(_reader(shards, shuffle=False, device="gpu"))
    for a, b in zip(cpu, gpu, strict=True):
        assert a.key == b.key
        for x, y in zip(a.images, b.images, strict=True):  # nvJPEG vs libjpeg-turbo: a few levels
            assert (x - y.cpu()).abs().max() * 127.5 <= 4
        for x, y in zip(a.mels, b.mels, strict=True):
            assert (x - y.cpu()).abs().max() <= 0.25
