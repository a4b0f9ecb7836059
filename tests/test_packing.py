"""Greedy packing and the resumable batch stream."""

import torch

from omnidiff.data.streams.batches import PackedBatchStream
from omnidiff.data.streams.synthetic import SyntheticMultimodal, SyntheticSource
from omnidiff.data.tokens.packing import SequencePacker, TokenSample, collate_rows
from omnidiff.data.tokens.text import ByteTokenizer
from omnidiff.data.tokens.vocab import UnifiedVocab
from omnidiff.data.tokens.noising import TailPadder


def _sample(n, value):
    return TokenSample(torch.full((n,), value), torch.arange(n) >= n // 2, task=f"t{value}")


def test_greedy_packing_layout():
    packer = SequencePacker(seq_length=10, pad_id=0)
    rows = [packer.add(s) for s in (_sample(4, 1), _sample(5, 2), _sample(3, 3), _sample(11, 4),
                                    _sample(6, 5))]
    assert rows[:2] == [None, None] and [len(s) for s in rows[2]] == [4, 5]
    assert rows[3] is None and packer.oversize_skipped == 1  # 11 > 10: dropped, counted
    assert rows[4] is None and [len(s) for s in packer.flush()] == [3, 6]  # 3 + 6 fits
    batch = collate_rows([rows[2]], 10, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]]
    assert batch.segment_ids.tolist() == [[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]]
    assert batch.target_mask.tolist() == [[False, False, True, True, False, False, True, True, True, False]]
    assert batch.task_counts == {"t1": 1, "t2": 1}


def _stream():
    tokenizer = ByteTokenizer()
    vocab = UnifiedVocab.from_text_tokenizer(tokenizer)
    source = SyntheticSource(SyntheticMultimodal(vocab, tokenizer, seed=3), start=1, step=2)
    return PackedBatchStream(source, 128, vocab.eos_id, rows=2,
                             transform=TailPadder(vocab.eos_id, seed=5))


def test_stream_resumes_exactly():
    reference = _stream()
    expected = [next(reference) for _ in range(6)]
    first = _stream()
    for _ in range(3):
        next(first)
    state = first.state_dict()
    resumed = _stream()
    resumed.load_state_dict(state)
    for want in expected[3:]:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.tail_pad_mask, want.tail_pad_mask)
