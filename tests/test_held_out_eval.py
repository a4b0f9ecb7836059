"""Held-out evaluation while training: the held-out set (first samples of each stage task, from a
demo set of another seed), ``eval/...`` metrics at the interval and at the end, the artefact
folders, the same files in the MLflow run, and the configurations it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from omnidiff import ConfigError
from omnidiff.data.demo.build import build_demo_dataset
from omnidiff.data.media.reader import MediaReaderConfig
from omnidiff.data.streams.mixture import load_mixture_config
from omnidiff.data.tokenizers.fit import fit_demo_tokenizers
from omnidiff.data.tokens.text import build_vocab
from omnidiff.monitoring.sinks import read_metrics
from omnidiff.platform.config import build_config
from omnidiff.platform.held_out import held_out_samples
from omnidiff.platform.trainer import Trainer

CODES = 32
PER_TASK = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    build_demo_dataset(root / "train", 24, speech="library", image_size=32, workers=1,
                       progress=False)
    build_demo_dataset(root / "heldout", 32, seed=1, speech="library", image_size=32, workers=1,
                       progress=False)
    mixture = load_mixture_config(root / "train" / "mixture.yaml")
    readers = [MediaReaderConfig(shards=mixture.shard_specs(name), image_size=16,
                                 generated_image_size=16, device="cpu") for name in mixture.sources]
    fitted = fit_demo_tokenizers(readers, root / "tokenizers", 24, CODES, CODES, progress=False)
    return {"root": root, "fitted": fitted}


def _config(demo: dict, output: Path, **evaluation) -> dict:
    fitted = demo["fitted"]
    return {
        "seed": 5, "output_dir": str(output),
        "model": {"preset": "tiny", "num_layers": 2},
        "data": {"source": "shards", "mixture": str(demo["root"] / "train" / "mixture.yaml"),
                 "stage": "stage2", "text_tokenizer": "byte",
                 "image_tokenizer": {"kind": "kmeans_image", "path": str(fitted.image_path)},
                 "speech_tokenizer": {"kind": "kmeans_speech", "path": str(fitted.speech_path)},
                 "image_codebook_size": CODES, "speech_codebook_size": CODES,
                 "image_size": 16, "generated_image_size": 16, "seq_length": 256,
                 "micro_batch_size": 2, "global_batch_size": 2},
        "schedule": {"train_steps": 4},
        "logging": {"log_interval": 2, "progress_bar": False, "mlflow": True,
                    "mlflow_experiment": "held-out",
                    "mlflow_tracking_uri": f"sqlite:///{output / 'mlflow.db'}"},
        "evaluation": {"mixture": str(demo["root"] / "heldout" / "mixture.yaml"),
                       "samples_per_task": PER_TASK, "batch_size": 4,
                       "sampler": {"steps": 4}, **evaluation},
    }


def test_held_out_set_is_the_stage_tasks_first_samples_every_time(demo, tmp_path):
    cfg = build_config(_config(demo, tmp_path))
    vocab, tokenizer = build_vocab(cfg.data)
    first = held_out_samples(cfg, vocab, tokenizer)
    again = held_out_samples(cfg, vocab, tokenizer)
    stage2 = {"text_to_image", "captioning", "vqa", "text", "asr", "tts"}
    assert sorted(s.task for s in first) == sorted(t for t in stage2 for _ in range(PER_TASK))
    assert all(a.tokens.equal(b.tokens) for a, b in zip(first, again))
    training = {tuple(s.tokens.tolist()) for s in held_out_samples(
        build_config(_config(demo, tmp_path, mixture=str(demo["root"] / "train" /
                                                         "mixture.yaml"))), vocab, tokenizer)}
    assert not training & {tuple(s.tokens.tolist()) for s in first}  # another seed: other data


def test_training_evaluates_at_the_interval_and_the_end_into_metrics_files_and_mlflow(
        demo, tmp_path, single_process):
    from mlflow.tracking import MlflowClient

    output = tmp_path / "run"
    Trainer(build_config(_config(demo, output, interval=2))).run()
    rows = [row for row in read_metrics(output) if "eval/masked_accuracy" in row]
    assert [row["step"] for row in rows] == [2, 4]
    final = rows[-1]
    for name in ("captioning/wer", "asr/exact_match", "text_to_image/code_accuracy",
                 "text_to_image/psnr", "tts/roundtrip_wer", "asr/masked_accuracy"):
        assert f"eval/{name}" in final, name
    assert "loss" in final  # one row per step: training and evaluation metrics together
    folder = output / "eval" / "step_00000004"
    grid = Image.open(folder / "images" / "text_to_image_grid.png")
    assert grid.size == (2 * 128 + 2, PER_TASK * 128 + 2)  # generated | reference per row
    assert sorted(p.name for p in (folder / "audio").iterdir())
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("held-out").experiment_id])[0]
    assert run.data.metrics["eval/masked_accuracy"] == pytest.approx(final["eval/masked_accuracy"])
    logged = {item.path for item in client.list_artifacts(run.info.run_id,
                                                          "eval/step_00000004/images")}
    assert logged == {"eval/step_00000004/images/text_to_image_grid.png"}
    artifacts = Path(client.get_experiment_by_name("held-out").artifact_location
                     .removeprefix("file://"))
    assert artifacts.parent == output  # beside the store, not in the working directory


@pytest.mark.parametrize("change, message", [
    ({"parallel": {"pipeline_parallel": 2, "nproc_per_node": 2}}, "pipeline_parallel 1"),
    ({"data": {"source": "token_shards", "image_tokenizer": None, "speech_tokenizer": None}},
     "data.image_tokenizer"),
])
def test_evaluation_refuses_what_it_cannot_run_in_one_line(demo, tmp_path, change, message):
    raw = _config(demo, tmp_path)
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message) as caught:
        build_config(raw)
    assert "\n" not in str(caught.value)
