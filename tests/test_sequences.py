"""Task sequences against hand-written layouts, and the mixture sampler's ratios and resume.

Expected ids are typed out from the ByteTokenizer's definition (UTF-8 bytes; 256..259 are
<|endoftext|> <|im_start|> <|im_end|> <|mask|>) and the vocabulary layout with 16 speech and 8
image codes: multimodal specials start at 260, so <|begin_of_image|> 260, <|end_of_image|> 261,
<|begin_of_audio|> 277, <|end_of_audio|> 278, speech codes 281.., image codes 297..
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from omnidiff.data.streams.mixture_sampler import MixtureError, MixtureSampler
from omnidiff.data.tokens.sequences import SampleError, SequenceBuilder
from omnidiff.data.tokens.text import ByteTokenizer
from omnidiff.data.tokens.vocab import UnifiedVocab

IM_START, IM_END = 257, 258
BOI, EOI, BOA, EOA = 260, 261, 277, 278
SPEECH0, IMAGE0 = 281, 297
NL = 10


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def layout(*segments: tuple[list[int], bool]) -> tuple[list[int], list[bool]]:
    tokens, mask = [], []
    for ids, target in segments:
        tokens += ids
        mask += [target] * len(ids)
    return tokens, mask


@pytest.fixture
def builder() -> SequenceBuilder:
    tok = ByteTokenizer()
    return SequenceBuilder(UnifiedVocab.from_text_tokenizer(tok, 16, 8), tok)


def check(sample, expected: tuple[list[int], list[bool]], task: str) -> None:
    tokens, mask = expected
    assert sample.tokens.tolist() == tokens
    assert sample.target_mask.tolist() == mask
    assert sample.task == task


def test_captioning(builder):
    sample = builder.captioning("What is this?", "A cat.", [3, 1])
    check(sample, layout(
        ([IM_START, *b("user\n"), *b("What is this?\n"), BOI, IMAGE0 + 3, IMAGE0 + 1, EOI, IM_END, NL],
         False),
        ([IM_START, *b("assistant\n")], False),
        ([*b("A cat."), IM_END, NL], True)), "captioning")


def test_text_to_image(builder):
    sample = builder.text_to_image("a red circle", [7, 0, 2])
    check(sample, layout(
        ([IM_START, *b("user\n"),
          *b("Generate an image based on the provided text description.\na red circle"),
          IM_END, NL, IM_START, *b("assistant\n")], False),
        ([BOI, IMAGE0 + 7, IMAGE0 + 0, IMAGE0 + 2, EOI, IM_END, NL], True)), "text_to_image")


def test_asr(builder):
    sample = builder.asr("hello", [15, 4])
    check(sample, layout(
        ([IM_START, *b("user\n"), *b("Convert the speech to text.\n"), BOA, SPEECH0 + 15,
          SPEECH0 + 4, EOA, IM_END, NL, IM_START, *b("assistant\n")], False),
        ([*b("hello"), IM_END, NL], True)), "asr")


def test_tts(builder):
    sample = builder.tts("hi there", [0, 9, 9])
    check(sample, layout(
        ([IM_START, *b("user\n"), *b("Convert the text to speech.\nhi there"), IM_END, NL,
          IM_START, *b("assistant\n")], False),
        ([BOA, SPEECH0, SPEECH0 + 9, SPEECH0 + 9, EOA, IM_END, NL], True)), "tts")


def test_speech_to_image(builder):
    sample = builder.speech_to_image([5], [6, 6])
    check(sample, layout(
        ([IM_START, *b("system\n"), *b("Please generate an image based on the input audio."),
          IM_END, NL, IM_START, *b("user\n"), BOA, SPEECH0 + 5, EOA, IM_END, NL,
          IM_START, *b("assistant\n")], False),
        ([BOI, IMAGE0 + 6, IMAGE0 + 6, EOI, IM_END, NL], True)), "speech_to_image")


def test_spoken_vqa(builder):
    sample = builder.spoken_vqa([1, 2], [4], "red", [12])
    check(sample, layout(
        ([IM_START, *b("system\n"),
          *b("Please response the input audio based on the given image."), IM_END, NL,
          IM_START, *b("user\n"), BOA, SPEECH0 + 1, SPEECH0 + 2, EOA, NL, BOI, IMAGE0 + 4, EOI,
          IM_END, NL, IM_START, *b("assistant\n")], False),
        ([*b("red\n"), BOA, SPEECH0 + 12, EOA, IM_END, NL], True)), "spoken_vqa")


def test_text_chat_every_assistant_turn_is_a_target(builder):
    sample = builder.chat([("Hi", "Hello."), ("2+2?", "4")])
    check(sample, layout(
        ([IM_START, *b("user\nHi"), IM_END, NL, IM_START, *b("assistant\n")], False),
        ([*b("Hello."), IM_END, NL], True),
        ([IM_START, *b("user\n2+2?"), IM_END, NL, IM_START, *b("assistant\n")], False),
        ([*b("4"), IM_END, NL], True)), "text")


def test_generic_builder_with_dream_ids():
    """Special and code ids come from the vocabulary: the Dream layout gives REFERENCE §2 ids."""
    builder = SequenceBuilder(UnifiedVocab.dream(), ByteTokenizer())
    messages = [{"role": "user", "content": "<speech>"},
                {"role": "assistant", "content": "<image>"}]
    sample = builder.build_from_messages(messages, images_codes=[torch.tensor([8191])],
                                         speech_codes=[[16383, 0]], task="x")
    check(sample, layout(
        ([151644, *b("user\n"), 151684, 168071, 151688, 151685, 151645, NL,
          151644, *b("assistant\n")], False),
        ([151667, 176263, 151668, 151645, NL], True)), "x")


@pytest.mark.parametrize("messages, images, speech, message", [
    ([{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "x"}],
     [[1]], [], "2 <image> placeholder(s) but 1 image"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
     [], [[1]], "0 <speech> placeholder(s) but 1 speech"),
    ([{"role": "bot", "content": "hi"}], [], [], "unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], [], [],
     "empty assistant turn"),
    ([{"role": "user", "content": "hi"}], [], [], "no assistant turn"),
    ([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
     [[8]], [], "out of range"),
    ([{"role": "user", "content": "<speech>"}, {"role": "assistant", "content": "x"}],
     [], [[]], "non-empty"),
    ([], [], [], "no messages"),
])
def test_bad_samples_raise_sample_error(builder, messages, images, speech, message):
    with pytest.raises(SampleError, match=re.escape(message)):
        builder.build_from_messages(messages, images, speech)


# --- mixture sampler ------------------------------------------------------------------------
def _sources(lengths: dict[str, int]):
    def factory(name: str, n: int):
        return lambda pass_index: (f"{name}:{pass_index}:{i}" for i in range(n))
    return {name: factory(name, n) for name, n in lengths.items()}


def test_mixture_ratios_match_over_many_draws():
    sampler = MixtureSampler(_sources({"a": 7, "b": 11, "c": 3, "unused": 5}),
                             {"a": 5, "b": 3, "c": 2}, seed=3)
    draws = 20_000
    counts = Counter(name for name, _ in (next(sampler) for _ in range(draws)))
    assert set(counts) == {"a", "b", "c"}
    for name, expected in {"a": 0.5, "b": 0.3, "c": 0.2}.items():
        assert abs(counts[name] / draws - expected) < 0.015, (name, counts)


def test_mixture_cycles_each_source_in_order():
    sampler = MixtureSampler(_sources({"a": 3, "b": 2}), {"a": 1, "b": 1}, seed=0)
    seen = [s for name, s in (next(sampler) for _ in range(40)) if name == "a"]
    assert seen[:7] == ["a:0:0", "a:0:1", "a:0:2", "a:1:0", "a:1:1", "a:1:2", "a:2:0"]


def test_mixture_is_deterministic_by_seed():
    def run(seed):
        sampler = MixtureSampler(_sources({"a": 4, "b": 4}), {"a": 1, "b": 1}, seed=seed)
        return [next(sampler) for _ in range(50)]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_mixture_resume_gives_the_same_continuation():
    ratios = {"a": 0.6, "b": 0.3, "c": 0.1}
    sampler = MixtureSampler(_sources({"a": 5, "b": 9, "c": 2}), ratios, seed=11)
    for _ in range(137):
        next(sampler)
    state = json.loads(json.dumps(sampler.state_dict()))  # storable in a checkpoint
    expected = [next(sampler) for _ in range(300)]
    resumed = MixtureSampler(_sources({"a": 5, "b": 9, "c": 2}), ratios, seed=999)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(300)] == expected


def test_mixture_errors():
    with pytest.raises(MixtureError, match="unknown sources"):
        MixtureSampler(_sources({"a": 1}), {"b": 1})
    with pytest.raises(MixtureError, match=">= 0"):
        MixtureSampler(_sources({"a": 1}), {"a": -1})
    with pytest.raises(MixtureError, match="no samples"):
        next(MixtureSampler(_sources({"a": 0}), {"a": 1}))
    state = MixtureSampler(_sources({"a": 1, "b": 1}), {"a": 1, "b": 1}).state_dict()
    with pytest.raises(MixtureError, match="state is for sources"):
        MixtureSampler(_sources({"a": 1}), {"a": 1}).load_state_dict(state)
