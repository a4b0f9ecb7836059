"""Media shards into training: tokenising, 5 % corrupted data, token shards, mixtures, resume.

One synthetic shard set (160 samples, 8 of them corrupted: two each of truncated image, garbage
audio, broken JSON, missing field) and demo tokenizers fitted to it serve every test.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from omnidiff.data.tokenizers.fit import fit_demo_tokenizers
from omnidiff.data.media.reader import MediaReaderConfig
from omnidiff.data.streams.media_tokenize import MediaTokenizerError, Rejected, SampleTokenizer, load_tokenizers
from omnidiff.data.streams.pretokenize import tokenize_shards
from omnidiff.data.tokens.sequences import SequenceBuilder
from omnidiff.data.streams.shard_stream import ShardStream, reader_config
from omnidiff.data.media.shards import ShardError
from omnidiff.data.streams.sources import build_sample_source
from omnidiff.data.media.synthetic import write_synthetic_shards
from omnidiff.data.streams.token_shards import TokenShardSource
from omnidiff.platform.cli import main
from omnidiff.platform.config import ConfigError, build_config
from omnidiff.data.tokens.text import build_vocab

NUM_SAMPLES = 160
CORRUPT = {5: "truncated_image", 41: "truncated_image", 12: "garbage_audio", 73: "garbage_audio",
           24: "bad_json", 100: "bad_json", 66: "missing_field", 158: "missing_field"}
CODES = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    shards = write_synthetic_shards(root / "part-%02d.tar", NUM_SAMPLES, samples_per_shard=40,
                                    corrupt=CORRUPT, image_sizes=((40, 32),), audio_seconds=0.2)
    fitted = fit_demo_tokenizers(
        [MediaReaderConfig(shards=[str(s) for s in shards], image_size=16,
                           generated_image_size=16, device="cpu")], root / "tokenizers",
        NUM_SAMPLES, CODES, CODES, progress=False)
    mixture = root / "mixture.yaml"  # two sources: the first two shards and the last two
    mixture.write_text(yaml.safe_dump({
        "sources": {"early": {"shards": [shards[0].name, shards[1].name]},
                    "late": {"shards": [shards[2].name, shards[3].name]}},
        "stages": {"stage1": {"early": 0.7, "late": 0.3}}}))
    return {"root": root, "shards": [str(s) for s in shards], "fitted": fitted,
            "mixture": str(mixture)}


def _raw(dataset, tmp_path, **data) -> dict:
    fitted = dataset["fitted"]
    return {"seed": 3, "output_dir": str(tmp_path / "run"), "model": {"preset": "tiny"},
            "data": {"source": "shards", "paths": dataset["shards"], "text_tokenizer": "byte",
                     "image_tokenizer": {"kind": "kmeans_image", "path": str(fitted.image_path)},
                     "speech_tokenizer": {"kind": "kmeans_speech",
                                          "path": str(fitted.speech_path)},
                     "image_codebook_size": CODES, "speech_codebook_size": CODES,
                     "image_size": 16, "generated_image_size": 16, "reader_batch_size": 16,
                     "shuffle_buffer": 64, "seq_length": 256, "micro_batch_size": 2,
                     "global_batch_size": 4, **data},
            "optimizer": {"lr": 2e-3}, "schedule": {"train_steps": 20, "warmup_fraction": 0.1},
            "logging": {"log_interval": 1, "progress_bar": False}}


def _write_config(raw: dict, tmp_path) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _tokenizer(cfg) -> SampleTokenizer:
    vocab, text = build_vocab(cfg.data)
    image, speech = load_tokenizers(cfg.data.image_tokenizer, cfg.data.speech_tokenizer, vocab)
    return SampleTokenizer(SequenceBuilder(vocab, text), image, speech, cfg.data.seq_length)


def test_corrupted_shards_train_through_and_count_every_bad_sample(dataset, tmp_path, capsys):
    raw = _raw(dataset, tmp_path)
    assert main(["train", _write_config(raw, tmp_path)]) == 0
    assert "trained 20 steps" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    last = records[-1]
    assert last["data/samples_read"] >= NUM_SAMPLES  # at least one whole pass over the shards
    assert last["data/skipped_samples"] == len(CORRUPT) == 8
    # skip events: every reason at least once per bad sample (a second pass meets them again)
    events = {k.removeprefix("data/skipped/"): v for k, v in last.items()
              if k.startswith("data/skipped/") and v}
    assert set(events) == {"bad_image", "bad_audio", "bad_json", "bad_record"}
    assert min(events.values()) >= 2 and sum(events.values()) == last["data/skipped_total"]
    losses = [r["loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[-3:]) < losses[0]


def test_sample_tokenizer_lays_out_media_codes_and_rejects_long_samples(dataset, tmp_path):
    cfg = build_config(_raw(dataset, tmp_path, seq_length=100))
    tokenize = _tokenizer(cfg)
    vocab = tokenize.builder.vocab
    stream = ShardStream(reader_config(cfg.data, dataset["shards"][:1], seed=0, shuffle=False),
                         tokenize)
    batch = next(stream.reader)
    results = tokenize(batch)
    image_ids = range(vocab.image_offset, vocab.image_offset + CODES)
    speech_ids = range(vocab.speech_offset, vocab.speech_offset + CODES)
    for sample, result in zip(batch.samples, results, strict=True):
        if isinstance(result, Rejected):
            assert result.reason == "too_long" and "> seq_length 100" in result.detail
            continue
        tokens = result.tokens.tolist()
        n_image = sum(t in image_ids for t in tokens)
        n_speech = sum(t in speech_ids for t in tokens)
        assert n_image == 4 * len(sample.images)  # 16 px / 8 px patches = 2 x 2 codes
        expected = [-(-len(a) // 1280) for a in sample.audios]  # 12.5 codes per second
        assert n_speech == sum(expected)
        assert tokens.count(vocab.begin_of_image_id) == len(sample.images)
    assert any(isinstance(r, Rejected) for r in results)  # text-to-image (103) and spoken VQA (124) do not fit
    assert any(not isinstance(r, Rejected) for r in results)


def test_tokenize_command_writes_token_shards_equal_to_the_live_path(dataset, tmp_path, capsys):
    raw = _raw(dataset, tmp_path)
    out = tmp_path / "tokens"
    assert main(["tokenize", _write_config(raw, tmp_path), str(out), "--shard-size", "50",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "read 160, wrote 152 samples in 4 token shards" in printed
    assert "bad_image 2" in printed and "bad_json 2" in printed

    cfg = build_config(raw)
    vocab, _ = build_vocab(cfg.data)
    stored = TokenShardSource(str(out / "data-*.npz"), vocab, seed=0)
    assert stored.total == 152
    live = ShardStream(reader_config(cfg.data, dataset["shards"], seed=0, shuffle=False),
                       _tokenizer(cfg))
    want = sorted(tuple(next(live).tokens.tolist()) for _ in range(152))
    got = [next(stored) for _ in range(152)]
    assert sorted(tuple(s.tokens.tolist()) for s in got) == want
    assert all(s.task for s in got)

    token_cfg = _raw(dataset, tmp_path, source="token_shards", paths=[],
                     mixture=str(out / "mixture.yaml"), stage="default")
    token_cfg["output_dir"] = str(tmp_path / "token_run")
    assert main(["train", _write_config(token_cfg, tmp_path), "schedule.train_steps=4"]) == 0
    assert "trained 4 steps" in capsys.readouterr().out


def test_token_shards_split_by_rank_resume_and_check_the_vocabulary(dataset, tmp_path):
    raw = _raw(dataset, tmp_path)
    cfg = build_config(raw)
    vocab, text = build_vocab(cfg.data)
    tokenize_shards(cfg.data, tmp_path / "tok", vocab, text, shard_size=40, progress=False)
    spec = str(tmp_path / "tok" / "data-*.npz")
    ranks = [TokenShardSource(spec, vocab, seed=1, dp_rank=r, dp=2) for r in range(2)]
    epoch = [tuple(next(ranks[r]).tokens.tolist()) for _ in range(76) for r in range(2)]
    single = TokenShardSource(spec, vocab, seed=1)
    assert sorted(epoch) == sorted(tuple(next(single).tokens.tolist()) for _ in range(152))

    source = TokenShardSource(spec, vocab, seed=5)
    for _ in range(170):  # into the second epoch
        next(source)
    state = source.state_dict()
    expected = [next(source).tokens for _ in range(20)]
    restored = TokenShardSource(spec, vocab, seed=5)
    restored.load_state_dict(state)
    assert all(torch.equal(a, next(restored).tokens) for a in expected)

    other = build_vocab(build_config({**raw, "data": {**raw["data"], "image_codebook_size": 128}}).data)[0]
    with pytest.raises(ShardError, match="another vocabulary.*image_codebook_size"):
        TokenShardSource(spec, other)
    (tmp_path / "tok" / "data-000001.npz").write_bytes(b"not a zip")
    with pytest.raises(ShardError, match="data-000001.npz: cannot read"):
        TokenShardSource(spec, vocab)


def test_mixture_source_resumes_exactly(dataset, tmp_path):
    cfg = build_config(_raw(dataset, tmp_path, paths=[], mixture=dataset["mixture"],
                            stage="stage1"))
    vocab, text = build_vocab(cfg.data)
    source = build_sample_source(cfg.data, cfg.seed, vocab, text)
    for _ in range(25):
        next(source)
    state = source.state_dict()
    expected = [next(source).tokens for _ in range(30)]
    assert source.metrics()["samples_read"] >= 55
    restored = build_sample_source(cfg.data, cfg.seed, vocab, text)
    restored.load_state_dict(state)
    assert all(torch.equal(a, next(restored).tokens) for a in expected)


def test_bad_data_configs_are_one_line_errors(dataset, tmp_path, capsys):
    raw = _raw(dataset, tmp_path)
    with pytest.raises(ConfigError, match="needs image_tokenizer and speech_tokenizer"):
        build_config({**raw, "data": {**raw["data"], "image_tokenizer": None}})
    with pytest.raises(ConfigError, match="exactly one of mixture or paths"):
        build_config({**raw, "data": {**raw["data"], "mixture": dataset["mixture"]}})
    small = build_config({**raw, "data": {**raw["data"], "image_codebook_size": 32}})
    with pytest.raises(MediaTokenizerError, match="64 codes does not fit the vocabulary's 32"):
        build_sample_source(small.data, small.seed, *build_vocab(small.data))
    missing = {**raw, "data": {**raw["data"], "paths": [str(tmp_path / "nope-*.tar")]}}
    assert main(["train", _write_config(missing, tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "matches no file" in err and len(err.splitlines()) == 1


def test_training_on_shards_resumes_exactly(dataset, tmp_path, capsys):
    raw = _raw(dataset, tmp_path, paths=[], mixture=dataset["mixture"], stage="stage1")
    raw["schedule"]["train_steps"] = 8
    raw["checkpoint"] = {"save_interval": 4, "keep_last": 3}
    config = _write_config(raw, tmp_path)
    run = tmp_path / "run"
    assert main(["train", config]) == 0
    full = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()]
    (run / "metrics.jsonl").unlink()
    for part in (run / "checkpoints" / "step_00000008").iterdir():
        part.unlink()
    (run / "checkpoints" / "step_00000008").rmdir()
    assert main(["train", config, "--resume", "auto"]) == 0
    resumed = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()]
    assert resumed == full[4:]  # exactly: reader checkpoints + tokenised-but-unused samples
    assert "trained 4 steps" in capsys.readouterr().out
