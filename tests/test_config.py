"""The run configuration: presets, overrides, and one clear line per bad key."""

import subprocess
import sys

import pytest

from omnidiff.platform.config import ConfigError, load_config


def test_presets_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: dream-7b\nschedule:\n  train_steps: 10\n")
    cfg = load_config(path, ["schedule.train_steps=42", "optimizer.betas=[0.9, 0.99]"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.ffn_hidden_size) == (3584, 28, 18944)
    assert (cfg.model.num_attention_heads, cfg.model.num_query_groups, cfg.model.head_dim) == (28, 4, 128)
    assert cfg.model.rope_theta == 1_000_000.0 and cfg.model.norm_eps == 1e-6
    assert cfg.schedule.train_steps == 42
    assert cfg.optimizer.betas == (0.9, 0.99)


def test_explicit_keys_beat_the_preset():
    cfg = load_config(None, ["model.preset=small", "model.num_layers=2"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 768


@pytest.mark.parametrize("override, needle", [
    (["model.hiden_size=64"], "model.hiden_size: unknown key"),
    (["nosuchsection.key=1"], "nosuchsection: unknown key"),
    (["schedule.train_steps=many"], "schedule.train_steps"),
    (["model.preset=custom", "model.hidden_size=100", "model.num_layers=2",
      "model.num_attention_heads=3", "model.num_query_groups=1", "model.ffn_hidden_size=8"],
     "num_attention_heads (3) must divide hidden_size (100)"),
    (["parallel.tensor_parallel=8"], "parallel.tensor_parallel (8) must divide model.num_attention_heads (4)"),
    (["parallel.sequence_parallel=true"], "sequence_parallel needs tensor_parallel > 1"),
    (["diffusion.importance_weighting=true"], "needs masking: per_sequence"),
    (["model.preset=huge"], "model.preset"),
    (["noequals"], "expected section.key=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert needle in str(err.value)
    assert "Traceback" not in str(err.value)


def test_cli_reports_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "omnidiff.platform.cli", "train", "model.num_layers=-1"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: model.num_layers")
