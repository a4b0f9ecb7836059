"""Continuous speech input (``data.speech_input=continuous``): frozen-encoder features through the
trained projector into the input embeddings at the ``<|context_of_audio|>`` places. The same
steps under TP = 2 + SP and PP = 2 as in one process; the media path gives user-turn speech as
SenseVoice features and assistant-turn speech as codes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from harness.parity import (
    global_batches, max_relative_difference, parity_config, run_parity, vocab_rows)
from omnidiff.data.tokens.vocab import CONTEXT_OF_AUDIO
from omnidiff.parallel import topology
from omnidiff.parallel.launcher import spawn

# 256-token rows: room for several samples, the speech tasks among them
CONTINUOUS = ("data.speech_input=continuous", "data.speech_feature_size=32", "data.seq_length=256")
RTOL = 1e-5


def _relative(got: list[float], want: list[float]) -> float:
    return max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))


def _worker(out: str, tp: int, pp: int, overrides: tuple[str, ...]) -> None:
    dims = topology.initialize(tp=tp, pp=pp)
    try:
        cfg = parity_config(*CONTINUOUS, *overrides)
        result, _ = run_parity(cfg, dims, global_batches(cfg), vocab_rows(cfg, 2))
        if dist.get_rank() == 0:
            torch.save({"losses": result.losses, "norms": result.grad_norms,
                        "final": result.final if pp == 1 else None}, out)
    finally:
        topology.destroy()


@pytest.fixture(scope="module")
def reference(single_process):
    """One process: the ParityResult of 5 steps with continuous speech."""
    cfg = parity_config(*CONTINUOUS)
    return run_parity(cfg, single_process, global_batches(cfg), vocab_rows(cfg, 2))[0]


def test_batches_carry_features_at_the_audio_placeholders(single_process):
    from omnidiff.data.tokens.text import build_vocab

    cfg = parity_config(*CONTINUOUS)
    batches = [b for step in global_batches(cfg) for b in step]
    assert sum(len(b.speech_features) > 0 for b in batches) >= len(batches) // 2
    batch = next(b for b in batches if len(b.speech_features))
    vocab, _ = build_vocab(cfg.data)
    places = batch.input_ids.reshape(-1)[batch.speech_positions]
    assert len(batch.speech_positions) == len(batch.speech_features) > 0
    assert bool((places == vocab.special_id(CONTEXT_OF_AUDIO)).all())
    assert batch.speech_features.shape[1] == 32
    assert not batch.loss_mask.reshape(-1)[batch.speech_positions].any()  # prompts: never masked


def test_the_projector_is_trained(reference):
    assert all(math.isfinite(x) for x in reference.losses)
    projector = {k: v for k, v in reference.final.items() if "speech_projector" in k}
    assert len(projector) == 4, sorted(projector)  # layer norm weight + bias, two linears
    moved = max_relative_difference(projector, {k: reference.initial[k] for k in projector})
    assert moved > 1e-3  # gradients reached it


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, overrides", [
    (2, 1, ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
            "parallel.zero_stage=1")),
    (1, 2, ("parallel.pipeline_parallel=2", "parallel.zero_stage=1")),
], ids=["tp2-sp", "pp2"])
def test_layouts_match_one_process(tmp_path, reference, tp, pp, overrides):
    out = str(tmp_path / "layout.pt")
    spawn(_worker, tp * pp, out, tp, pp, overrides)
    got = torch.load(out, weights_only=True)
    assert _relative(got["losses"], reference.losses) < RTOL
    assert _relative(got["norms"], reference.grad_norms) < RTOL
    if got["final"] is not None:
        assert max_relative_difference(got["final"], reference.final) < RTOL


def test_the_hf_class_hears_the_same_speech(single_process):
    """The exported form (HF class) takes the same features at the same places: same logits."""
    from omnidiff.parallel.engines import build_engine
    from omnidiff.parallel.resharding import gather_full_state_dict
    from omnidiff.platform.hf_convert import hf_config_from, megatron_to_hf
    from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion
    from omnidiff.platform.objective import DiffusionObjective

    cfg = parity_config(*CONTINUOUS)
    rows = vocab_rows(cfg, 1)
    engine = build_engine(cfg, single_process, rows, DiffusionObjective(cfg.diffusion))
    batch = next(b for step in global_batches(cfg) for b in step if len(b.speech_features))
    model = engine.model.eval()
    with torch.no_grad():
        want = model.logits(model(batch.input_ids, batch.position_ids, batch.segment_ids, None,
                                  batch.speech_features, batch.speech_positions)).transpose(0, 1)
        hf = OmniDiffusionForMaskedDiffusion(hf_config_from(
            cfg.model, rows, mask_token_id=0, pad_token_id=0, speech_feature_size=32)).eval()
        hf.load_state_dict(megatron_to_hf(gather_full_state_dict(model), cfg.model))
        got = hf(batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids,
                 speech_features=batch.speech_features,
                 speech_positions=batch.speech_positions).logits
    real = batch.segment_ids > 0
    assert float((got[real] - want[real]).abs().max()) < 1e-5
