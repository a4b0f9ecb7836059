"""Hostile media train through: every kind of bad sample is skipped and counted by reason, legal
but huge images decode within the per-call budget, and memory stays bounded.

One shard set mixes 60 good samples with one sample of every deliberate defect
(``data.media.synthetic.CORRUPTIONS``: NaN and infinite audio, zero-frame audio, empty, bomb and
BMP images, truncated images, garbage audio, deep, top-level-array, over-long and broken JSON,
wrong types in every field, a missing field), a sample whose only member has no extension, and a
shard of six legal 8000 x 8000 PNGs. ``omnidiff train`` runs in one process (so its own peak RSS
is the run's) through several passes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from omnidiff.data.media.reader import MediaReaderConfig
from omnidiff.data.media.shards import write_index
from omnidiff.data.media.synthetic import CORRUPTIONS, write_synthetic_shards
from omnidiff.data.tokenizers.fit import fit_demo_tokenizers

REPO = Path(__file__).resolve().parents[1]
CODES = 64
RSS_LIMIT_GB = 3.0
# sample index (layouts rotate with index % 5: 0 captioning, 2 ASR) -> defect, and its reason
IMAGE_DEFECTS = {"truncated_image": "bad_image", "empty_image": "missing_media",
                 "bomb_image": "bad_image", "bmp_image": "bad_image"}
AUDIO_DEFECTS = {"garbage_audio": "bad_audio", "nan_audio": "bad_audio",
                 "inf_audio": "bad_audio", "zero_frames_audio": "bad_audio"}
RECORD_DEFECTS = {"bad_json": "bad_json", "missing_field": "bad_record", "deep_json": "bad_json",
                  "json_array": "bad_json", "wrong_types": "bad_record", "huge_json": "too_long"}
REASON = {**IMAGE_DEFECTS, **AUDIO_DEFECTS, **RECORD_DEFECTS}


def _defects() -> dict[int, str]:
    plan, captioning, asr = {}, iter(range(0, 400, 5)), iter(range(2, 400, 5))
    for kind in IMAGE_DEFECTS:
        plan[next(captioning)] = kind
    for kind in AUDIO_DEFECTS:
        plan[next(asr)] = kind
    others = (i for i in range(1, 400) if i % 5 not in (0, 2))
    for kind in RECORD_DEFECTS:
        plan[next(others)] = kind
    return plan


def _nameless_shard(path: Path) -> Path:
    """A shard of two good samples around one whose only member has no extension."""
    good = write_synthetic_shards(path.parent / "tmp-%02d.tar", 2, samples_per_shard=2,
                                  image_sizes=((40, 32),), audio_seconds=0.2)[0]
    with tarfile.open(good) as source, tarfile.open(path, "w") as out:
        members = source.getmembers()
        half = len(members) // 2
        for member in members[:half]:
            out.addfile(member, source.extractfile(member))
        info = tarfile.TarInfo("nameless")
        info.size = 3
        out.addfile(info, io.BytesIO(b"???"))
        for member in members[half:]:
            out.addfile(member, source.extractfile(member))
    good.unlink()
    write_index(path)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    plan = _defects()
    assert set(plan.values()) | {"huge_image"} == set(CORRUPTIONS)
    shards = write_synthetic_shards(root / "mixed-%02d.tar", 60 + len(plan), samples_per_shard=40,
                                    corrupt=plan, image_sizes=((40, 32),), audio_seconds=0.2)
    huge = write_synthetic_shards(root / "huge-%02d.tar", 6, samples_per_shard=6,
                                  corrupt={i: "huge_image" for i in range(0, 30, 5)},
                                  image_sizes=((40, 32),), audio_seconds=0.2)
    shards += [*huge, _nameless_shard(root / "nameless.tar")]
    fitted = fit_demo_tokenizers(
        [MediaReaderConfig(shards=[str(shards[0])], image_size=16, generated_image_size=16,
                           device="cpu")], root / "tokenizers", 40, CODES, CODES, progress=False)
    return {"root": root, "shards": [str(s) for s in shards], "fitted": fitted, "plan": plan}


def _run(hostile, tmp_path, **data) -> tuple[subprocess.CompletedProcess, list[dict], float]:
    fitted = hostile["fitted"]
    raw = {"seed": 3, "output_dir": str(tmp_path / "run"), "model": {"preset": "tiny"},
           "data": {"source": "shards", "paths": hostile["shards"], "text_tokenizer": "byte",
                    "image_tokenizer": {"kind": "kmeans_image", "path": str(fitted.image_path)},
                    "speech_tokenizer": {"kind": "kmeans_speech", "path": str(fitted.speech_path)},
                    "image_codebook_size": CODES, "speech_codebook_size": CODES,
                    "image_size": 16, "generated_image_size": 16, "reader_batch_size": 16,
                    "shuffle_buffer": 64, "seq_length": 256, "micro_batch_size": 2,
                    "global_batch_size": 4, **data},
           "schedule": {"train_steps": 40}, "logging": {"log_interval": 1, "progress_bar": False}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    # VmHWM, not ru_maxrss: the latter would include this (pytest) process's peak (fork + exec)
    probe = ("import sys; from omnidiff.monitoring.peaks import peak_rss_bytes;"
             " from omnidiff.platform.cli import main; code = main(sys.argv[1:]);"
             " print('maxrss_kb', peak_rss_bytes() // 1024); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, "train", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()] \
        if (tmp_path / "run" / "metrics.jsonl").exists() else []
    rss = next((int(line.split()[1]) for line in done.stdout.splitlines()
                if line.startswith("maxrss_kb")), 0) / 2**20
    return done, rows, rss


@pytest.mark.slow
def test_every_hostile_kind_is_skipped_by_reason_and_memory_stays_bounded(hostile, tmp_path):
    done, rows, rss_gb = _run(hostile, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = rows[-1]
    assert last["data/samples_read"] > 60 + len(hostile["plan"]) + 6 + 3  # more than one pass
    bad = len(hostile["plan"]) + 1  # every defect but the legal huge images, plus the nameless
    assert last["data/skipped_samples"] == bad
    events = {k.removeprefix("data/skipped/"): v for k, v in last.items()
              if k.startswith("data/skipped/") and v}
    expected = {reason for reason in REASON.values()} | {"bad_json"}  # nameless: no .json
    assert set(events) == expected, events
    for kind, reason in REASON.items():  # each logged with its reason and a distinct key
        assert reason in done.stderr
    assert "<unnamed sample #0 of this epoch>" in done.stderr
    assert "image0" in done.stderr and "NaN or infinite samples" in done.stderr
    assert rss_gb < RSS_LIMIT_GB, f"peak RSS {rss_gb:.2f} GB"
    assert all(row["loss"] is not None for row in rows)
