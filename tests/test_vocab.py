"""The unified vocabulary, checked against the ids typed from REFERENCE §2 (not the code)."""

import pytest
import torch

from omnidiff.data.tokens.text import ByteTokenizer
from omnidiff.data.tokens.vocab import UnifiedVocab

# REFERENCE §2, typed by hand.
ENDOFTEXT, IM_START, IM_END, MASK = 151643, 151644, 151645, 151666
BEGIN_IMAGE, END_IMAGE, BEGIN_AUDIO, END_AUDIO = 151667, 151668, 151684, 151685
FIRST_SPEECH, LAST_SPEECH, FIRST_IMAGE, LAST_IMAGE = 151688, 168071, 168072, 176263
PADDED_SIZE = 176264


def test_dream_layout_ids():
    vocab = UnifiedVocab.dream()
    assert (vocab.eos_id, vocab.im_start_id, vocab.im_end_id, vocab.mask_id) == (
        ENDOFTEXT, IM_START, IM_END, MASK)
    assert (vocab.begin_of_image_id, vocab.end_of_image_id) == (BEGIN_IMAGE, END_IMAGE)
    assert (vocab.begin_of_audio_id, vocab.end_of_audio_id) == (BEGIN_AUDIO, END_AUDIO)
    assert vocab.speech_ids([0, 16383]).tolist() == [FIRST_SPEECH, LAST_SPEECH]
    assert vocab.image_ids([0, 8191]).tolist() == [FIRST_IMAGE, LAST_IMAGE]
    assert vocab.size == PADDED_SIZE and vocab.padded_size(1) == PADDED_SIZE
    assert vocab.padded_size(2) % 16 == 0 and vocab.padded_size(2) - PADDED_SIZE < 16


def test_every_special_token_is_named():
    vocab = UnifiedVocab.dream()
    assert vocab.token_name(MASK) == "<|mask|>"
    assert vocab.token_name(BEGIN_AUDIO) == "<|begin_of_audio|>"
    assert vocab.token_name(151669) == "<|context_of_image|>"
    assert vocab.token_name(151687) == "<|audio|>"
    assert vocab.token_name(FIRST_SPEECH + 5) == "<|audio_5|>"
    assert vocab.token_name(LAST_IMAGE) == "<|image_8191|>"
    assert vocab.token_name(1000) is None
    names = {vocab.token_name(i) for i in range(BEGIN_IMAGE, FIRST_SPEECH)}
    assert len(names) == FIRST_SPEECH - BEGIN_IMAGE and None not in names


def test_codes_round_trip_and_range_checks():
    vocab = UnifiedVocab.dream()
    codes = torch.tensor([0, 17, 8191])
    assert torch.equal(vocab.image_codes(vocab.image_ids(codes)), codes)
    assert torch.equal(vocab.speech_codes(vocab.speech_ids(codes)), codes)
    assert vocab.is_image(vocab.image_ids(codes)).all()
    assert not vocab.is_speech(vocab.image_ids(codes)).any()
    with pytest.raises(ValueError, match="image codes out of range"):
        vocab.image_ids([8192])
    with pytest.raises(ValueError, match="speech token ids out of range"):
        vocab.speech_codes([FIRST_IMAGE])


def test_same_scheme_on_the_byte_tokenizer():
    vocab = UnifiedVocab.from_text_tokenizer(ByteTokenizer())
    assert (vocab.eos_id, vocab.im_start_id, vocab.im_end_id, vocab.mask_id) == (256, 257, 258, 259)
    assert vocab.begin_of_image_id == 260 and vocab.begin_of_audio_id == 260 + 17
    assert vocab.speech_offset == 260 + 21 and vocab.image_offset == 260 + 21 + 16384
    assert vocab.size == 260 + 21 + 16384 + 8192
    assert vocab.padded_size(2) % 16 == 0


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("<|im_start|>user\nhé<|im_end|>")
    assert ids[0] == 257 and ids[-1] == 258
    assert tok.decode(ids) == "<|im_start|>user\nhé<|im_end|>"
