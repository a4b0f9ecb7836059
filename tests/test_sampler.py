"""The masked-diffusion sampler: its rules against hand-computed cases, its loop (schedule, label
shift, penalties, guidance, blocks, batching), the task prompts, and the same tokens from every
model form (megatron at TP = 1 and 2, the HF class)."""

from __future__ import annotations

import pytest
import torch

from omnidiff.data.tokens.text import ByteTokenizer
from omnidiff.data.tokens.vocab import UnifiedVocab
from omnidiff.parallel import topology
from omnidiff.parallel.launcher import spawn
from omnidiff.parallel.model import build_model
from omnidiff.platform.config import ModelConfig, ParallelConfig, load_config
from omnidiff.platform.hf_convert import hf_config_from, megatron_to_hf
from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion
from omnidiff.platform.sampling import (
    GenerationRequest, SamplerConfig, TaskPrompts, generate, hf_logits_fn, megatron_logits_fn,
    tp_sync)
from omnidiff.platform.sampling import rules

V, MASK = 32, 31  # toy token space of the fake models
PROMPT = [1, 2, 3]
TOKENIZER = ByteTokenizer()
VOCAB = UnifiedVocab.from_text_tokenizer(TOKENIZER, speech_codebook_size=16, image_codebook_size=16)
MODEL = ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=96, rope_theta=10_000.0)


pytestmark = pytest.mark.usefixtures("one_thread")


class FakeModel:
    """``logits_fn`` whose logit at absolute position p favours token ``10 + p % 5`` by
    ``strength(p)``; records every batch it is given."""

    def __init__(self, strength=lambda p: float(p), width: int = V) -> None:
        self.strength, self.width, self.calls = strength, width, []

    def __call__(self, ids, positions, segments):
        self.calls.append(ids.clone())
        logits = torch.zeros(*ids.shape, self.width)
        for p in range(ids.shape[1]):
            logits[:, p, 10 + p % 5] = self.strength(p)
        return logits


def _request(masks: int, **kwargs) -> GenerationRequest:
    return GenerationRequest(torch.tensor(PROMPT + [MASK] * masks), len(PROMPT), **kwargs)


def _run(model, requests, **config) -> list[torch.Tensor]:
    config = {"confidence": "max_prob", **config}
    return generate(model, requests, SamplerConfig(**config), mask_id=MASK, vocab_size=V)


def _masks_seen(model: FakeModel) -> list[int]:
    return [int((ids[0] == MASK).sum()) for ids in model.calls]


# --- rules, by hand -----------------------------------------------------------------------------
def test_timesteps_and_transfer_counts_by_hand():
    ts = rules.timesteps(4, eps=1e-3)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75025, 0.5005, 0.25075, 0.001],
                                                dtype=torch.float64))
    assert rules.transfer_count(10, 1.0, 0.75025, last=False) == 2  # int(2.4975)
    assert rules.transfer_count(8, 0.75025, 0.5005, last=False) == 2  # int(2.663)
    assert rules.transfer_count(6, 0.5005, 0.25075, last=False) == 2  # int(2.994)
    assert rules.transfer_count(4, 0.25075, 0.001, last=True) == 4  # the last step takes all
    assert rules.transfer_count(3, 1.0, 0.9, last=False) == 1  # int(0.3) = 0 -> at least one
    assert rules.transfer_count(0, 1.0, 0.5, last=False) == 0


def test_position_penalty_and_guidance_formulas_by_hand():
    factors = rules.position_penalty_factors(104, penalty=2.0, start=100)
    assert factors[:100].eq(1).all()
    torch.testing.assert_close(factors[100:], torch.tensor([1.0, 1.25, 1.5, 1.75]))
    assert rules.position_penalty_factors(100, penalty=2.0).eq(1).all()  # M <= 100: no penalty
    torch.testing.assert_close(rules.penalise(torch.tensor([-2.0, 3.0]), 2.0),
                               torch.tensor([-4.0, 1.5]))
    guided = rules.guided(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), scale=2.0)
    torch.testing.assert_close(guided, torch.tensor([2.0, 5.0]))  # 0.5 + 3 (c - u)
    assert rules.boa_offset(50, 0.2) == 10 and rules.boa_offset(3, 0.9) == 2


def test_confidences_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    chosen = torch.tensor([0, 0])
    torch.testing.assert_close(rules.confidence_of(probs, chosen, "max_prob"),
                               torch.tensor([0.5, 0.9]))
    torch.testing.assert_close(rules.confidence_of(probs, chosen, "margin"),
                               torch.tensor([0.2, 0.85]))
    entropy = torch.tensor([0.5 * torch.log(torch.tensor(0.5)) + 0.3 * torch.log(torch.tensor(0.3))
                            + 0.2 * torch.log(torch.tensor(0.2)),
                            0.9 * torch.log(torch.tensor(0.9)) + 0.1 * torch.log(torch.tensor(0.05))])
    torch.testing.assert_close(rules.confidence_of(probs, chosen, "neg_entropy"), entropy)


# --- the loop -----------------------------------------------------------------------------------
def test_schedule_commits_the_most_confident_and_shifts_labels():
    model = FakeModel()
    out = _run(model, [_request(10)], steps=4)[0]
    assert _masks_seen(model) == [10, 8, 6, 4]  # commits 2, 2, 2, then the last 4
    first = model.calls[1][0, len(PROMPT):]
    assert first[-2:].ne(MASK).all() and first[:-2].eq(MASK).all()  # latest = most confident
    # label shift: the token at position j is read from the logit at j - 1
    assert out[3:].tolist() == [10 + (p - 1) % 5 for p in range(3, 13)]
    unshifted = _run(FakeModel(), [_request(10)], steps=4, label_shift=False)[0]
    assert unshifted[3:].tolist() == [10 + p % 5 for p in range(3, 13)]


def test_position_penalty_changes_the_commit_order():
    model = FakeModel(strength=lambda p: 5.0)  # equally confident everywhere
    _run(model, [_request(4)], steps=4, position_penalty=3.0, penalty_start=0)
    order = [int((model.calls[i + 1][0] != model.calls[i][0]).nonzero()[0, 0]) for i in range(3)]
    assert order == [3, 4, 5]  # factors 1, 1.5, 2, 2.5 (then 1, 1.67, 2.33): earliest is surest


def test_padded_rows_and_the_mask_token_are_never_chosen():
    class Loud(FakeModel):
        def __call__(self, ids, positions, segments):
            logits = super().__call__(ids, positions, segments)
            logits[..., MASK] = 50.0
            logits[..., V:] = 100.0
            return logits

    out = _run(Loud(lambda p: 1.0, width=V + 8), [_request(6)], steps=3)[0]
    assert out[3:].lt(V).all() and out[3:].ne(MASK).all()


def test_top_k_one_equals_greedy_and_a_seed_fixes_sampling():
    def run(seed, **config):
        return generate(FakeModel(lambda p: 1.0 + 0.1 * p), [_request(8)],
                        SamplerConfig(steps=4, **config), mask_id=MASK, vocab_size=V,
                        generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(0, temperature=1.0, top_k=1), run(0))
    assert torch.equal(run(3, temperature=2.0), run(3, temperature=2.0))


def test_block_decoding_fills_blocks_in_order():
    model = FakeModel()  # later positions are surer: without blocks they would come first
    _run(model, [_request(8)], steps=4, block_size=4)
    after_first_block = model.calls[2][0, len(PROMPT):]
    assert after_first_block[:4].ne(MASK).all() and after_first_block[4:].eq(MASK).all()


def test_guidance_uses_the_unconditional_prompt_aligned_on_the_answer():
    cond_token, uncond_prompt = 7, torch.tensor([5, 6, 2, 3])

    def model(ids, positions, segments):
        logits = torch.zeros(*ids.shape, V)
        for row in range(ids.shape[0]):
            conditioned = bool((ids[row] == cond_token).any())
            logits[row, :, 20] = 1.0 if conditioned else 0.0  # the prompt pulls towards 20
            logits[row, :, 21] = 1.2  # a prompt-independent favourite
        return logits

    request = GenerationRequest(torch.tensor([cond_token, 1, 2, MASK, MASK]), 3,
                                uncond_prompt=uncond_prompt)
    plain = _run(model, [request], steps=2)[0]
    guided = _run(model, [request], steps=2, guidance=1.0)[0]
    assert plain[3:].tolist() == [21, 21]
    assert guided[3:].tolist() == [20, 20]  # u + 2 (c - u): 0 + 2 * 1 = 2 > 1.2
    recorder = FakeModel()
    _run(recorder, [request], steps=2, guidance=1.0)
    batch = recorder.calls[1]
    assert batch.shape[0] == 2  # the conditional and the unconditional row in one forward
    assert torch.equal(batch[1, :4], uncond_prompt)
    assert torch.equal(batch[1, 4:6], batch[0, 3:5])  # the same answer after the other prompt
    with pytest.raises(ValueError, match="unconditional"):
        _run(FakeModel(), [_request(2)], steps=1, guidance=1.0)


def _peaky_hf_model(seed: int = 0) -> OmniDiffusionForMaskedDiffusion:
    torch.manual_seed(seed)
    model = OmniDiffusionForMaskedDiffusion(hf_config_from(
        MODEL, VOCAB.padded_size(), mask_token_id=VOCAB.mask_id, pad_token_id=VOCAB.eos_id))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # confident, well separated choices, as a trained model
    return model.eval()


def test_batched_rows_of_different_lengths_match_one_at_a_time():
    prompts = TaskPrompts(VOCAB, TOKENIZER)
    requests = [prompts.text("hi", 6).request, prompts.text_to_image("a red circle", 16).request,
                prompts.tts("two words").request]
    logits_fn = hf_logits_fn(_peaky_hf_model())
    config = SamplerConfig(steps=5, position_penalty=2.0, penalty_start=4)
    batched = generate(logits_fn, requests, config, mask_id=VOCAB.mask_id, vocab_size=VOCAB.size)
    for request, tokens in zip(requests, batched):
        alone = generate(logits_fn, [request], config, mask_id=VOCAB.mask_id,
                         vocab_size=VOCAB.size)[0]
        assert torch.equal(tokens, alone)
        assert tokens.ne(VOCAB.mask_id).all()


# --- task prompts -------------------------------------------------------------------------------
def test_prompts_follow_the_training_layout():
    prompts = TaskPrompts(VOCAB, TOKENIZER)
    header = [VOCAB.im_start_id, *TOKENIZER.encode("assistant\n")]
    t2i = prompts.text_to_image("red circle", 16, torch.Generator().manual_seed(0))
    request = t2i.request
    assert request.tokens[:request.start].tolist()[-len(header):] == header
    nl = TOKENIZER.encode("\n")
    assert request.answer.tolist() == [VOCAB.begin_of_image_id, *[VOCAB.mask_id] * 16,
                                       VOCAB.end_of_image_id, VOCAB.im_end_id, *nl]
    assert t2i.settings == {"position_penalty": 2.0, "temperature": 1.0, "top_k": 20}
    prompt, uncond = request.tokens[:request.start], request.uncond_prompt
    caption = TOKENIZER.encode("red circle")
    end = len(prompt) - len([VOCAB.im_end_id, *nl, *header])
    begin = end - len(caption)
    assert prompt[begin:end].tolist() == caption and len(uncond) == len(prompt)
    assert torch.equal(uncond[:begin], prompt[:begin]) and torch.equal(uncond[end:], prompt[end:])
    assert not torch.equal(uncond[begin:end], prompt[begin:end])
    assert uncond[begin:end].lt(256).all()  # random plain text (bytes), never a special token

    s2i = prompts.speech_to_image(torch.tensor([1, 2, 3]), 16)
    assert s2i.settings == {**t2i.settings, "guidance": 2.0}
    silent = TOKENIZER.decode(s2i.request.uncond_prompt.tolist())
    assert "user\n<|im_end|>" in silent and "<|im_start|>assistant\n" in silent


def test_speech_prefill_and_adaptive_lengths():
    prompts = TaskPrompts(VOCAB, TOKENIZER)
    svqa = prompts.spoken_vqa(torch.tensor([1, 2]), torch.tensor([3, 4]), length=50).request
    assert svqa.answer[10] == VOCAB.begin_of_audio_id  # int(0.2 * 50)
    assert (svqa.answer == VOCAB.mask_id).sum() == 49
    tts = prompts.tts("abcd").request  # 4 byte tokens -> 3.5 x 4 = 14 answer tokens
    assert len(tts.answer) == 14 and tts.steps == 7 and tts.answer[0] == VOCAB.begin_of_audio_id
    asr = prompts.asr(torch.arange(12)).request
    assert len(asr.answer) == int(0.2 * asr.start) and asr.steps == len(asr.answer) // 2


# --- every model form gives the same tokens ------------------------------------------------------
def _megatron(tp: int, vocab_rows: int, seed: int = 5):
    topology.seed(seed)
    model = build_model(MODEL, ParallelConfig(tensor_parallel=tp), vocab_rows).eval()
    with torch.no_grad():
        model.output_layer.weight.mul_(30.0)
    return model


def _requests() -> list[GenerationRequest]:
    prompts = TaskPrompts(VOCAB, TOKENIZER)
    return [prompts.text("Which colour?", 8).request, prompts.tts("red").request]


SAMPLING = SamplerConfig(steps=4, temperature=1.0, top_k=8)


def _sample(logits_fn, sync=None) -> list[list[int]]:
    rows = generate(logits_fn, _requests(), SAMPLING, mask_id=VOCAB.mask_id,
                    vocab_size=VOCAB.size, generator=torch.Generator().manual_seed(11), sync=sync)
    return [row.tolist() for row in rows]


def test_hf_class_samples_the_megatron_models_tokens(single_process):
    megatron = _megatron(1, VOCAB.padded_size())
    hf = OmniDiffusionForMaskedDiffusion(hf_config_from(
        MODEL, VOCAB.padded_size(), mask_token_id=VOCAB.mask_id, pad_token_id=VOCAB.eos_id))
    hf.load_state_dict(megatron_to_hf(megatron.state_dict(), MODEL))
    assert _sample(hf_logits_fn(hf.eval())) == _sample(megatron_logits_fn(megatron))


def _tp_worker(out_dir: str) -> None:
    from pathlib import Path

    from omnidiff.platform import checkpoint

    dims = topology.initialize(tp=2)
    try:
        model = _megatron(2, VOCAB.padded_size(2))
        tokens = _sample(megatron_logits_fn(model), sync=tp_sync())
        torch.save(tokens, Path(out_dir) / f"tokens{dims.rank}.pt")
        raw = _run_config(tp=2)
        checkpoint.save(out_dir, 1, {"engine": {"model": model.state_dict()}, "step": 1},
                        keep_last=1, meta={"config": raw})
    finally:
        topology.destroy()


def _run_config(tp: int) -> dict:
    return load_config(None, [
        "model.preset=custom", "model.hidden_size=64", "model.num_layers=2",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=96",
        "model.rope_theta=10000.0", "data.image_codebook_size=16", "data.speech_codebook_size=16",
        f"parallel.tensor_parallel={tp}", f"parallel.nproc_per_node={tp}"]).model_dump(mode="json")


@pytest.mark.slow
def test_tp2_samples_the_tp1_tokens_and_its_checkpoint_merges(single_process, tmp_path):
    from omnidiff.platform.weights import full_weights

    spawn(_tp_worker, 2, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"tokens{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0 == rank1  # the TP ranks agree on every choice
    reference = _megatron(1, VOCAB.padded_size(2))
    assert rank0 == _sample(megatron_logits_fn(reference))
    raw, full = full_weights(tmp_path / "checkpoints" / "step_00000001")
    assert raw["parallel"]["tensor_parallel"] == 2
    expected = {k: v for k, v in reference.state_dict().items() if not k.endswith("_extra_state")}
    assert full.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(full[key], value, atol=0, rtol=0, msg=key)
