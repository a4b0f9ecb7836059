"""Text tokenizers behind one small interface (see :class:`omnidiff.data.tokens.vocab.TextTokenizer`).

``byte``: a built-in UTF-8 byte tokenizer (256 entries + the four chat specials) for tests and
the demo: no files, no downloads. Anything else is a local Hugging Face tokenizer directory
(e.g. Dream-7B's), loaded with ``local_files_only`` so nothing is fetched at run time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from omnidiff.data.config import DataConfig
from omnidiff.data.tokens.vocab import CHAT_SPECIALS, TextTokenizer, UnifiedVocab


class ByteTokenizer:
    """UTF-8 bytes 0..255, then ``<|endoftext|> <|im_start|> <|im_end|> <|mask|>`` (256..259).

    Special-token strings inside the text are encoded as their single ids, like HF tokenizers.
    ``size`` (``data.text_vocab_size``) pads the text vocabulary to that many entries, the
    specials taking its last four ids: a full-size vocabulary (151,667 = Dream's) without the
    Dream tokenizer files. Encoding never produces the padding ids.
    """

    _SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in CHAT_SPECIALS) + ")")

    def __init__(self, size: int | None = None) -> None:
        self._size = 256 + len(CHAT_SPECIALS) if size is None else size
        first = self._size - len(CHAT_SPECIALS)
        if first < 256:
            raise ValueError(f"a byte tokenizer needs at least {256 + len(CHAT_SPECIALS)} "
                             f"entries, got {size}")
        self._special_ids = {tok: first + i for i, tok in enumerate(CHAT_SPECIALS)}
        self._special_names = {i: tok for tok, i in self._special_ids.items()}

    def __len__(self) -> int:
        return self._size

    def token_to_id(self, token: str) -> int | None:
        return self._special_ids.get(token)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._SPECIAL_RE.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, buffer = [], bytearray()
        for i in ids:
            if i < 256:
                buffer.append(i)
                continue
            out.append(buffer.decode("utf-8", errors="replace"))
            buffer.clear()
            out.append(self._special_names.get(i, ""))
        out.append(buffer.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTextTokenizer:
    """A Hugging Face tokenizer from a local directory, adapted to :class:`TextTokenizer`.

    Chat specials the tokenizer lacks (``<|mask|>`` on a plain Qwen2 tokenizer) are added.
    """

    def __init__(self, directory: str | Path) -> None:
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"text tokenizer directory not found: {directory}")
        self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        missing = [t for t in CHAT_SPECIALS if self._tok.convert_tokens_to_ids(t) in (None, self._tok.unk_token_id)]
        if missing:  # add_tokens(special_tokens=True): the same on transformers 4 and 5
            self._tok.add_tokens(missing, special_tokens=True)

    def __len__(self) -> int:
        return len(self._tok)

    def token_to_id(self, token: str) -> int | None:
        token_id = self._tok.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self._tok.unk_token_id and token != self._tok.unk_token):
            return None
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_text_tokenizer(spec: str, text_vocab_size: int | None = None) -> TextTokenizer:
    """``"byte"`` for the built-in tokenizer (padded to ``text_vocab_size`` entries when given),
    else a local Hugging Face tokenizer directory."""
    if spec == "byte":
        return ByteTokenizer(text_vocab_size)
    return HFTextTokenizer(spec)


def build_vocab(data: DataConfig) -> tuple[UnifiedVocab, TextTokenizer]:
    """The run's unified vocabulary and the text tokenizer it is built on."""
    tokenizer = load_text_tokenizer(data.text_tokenizer, data.text_vocab_size)
    vocab = UnifiedVocab.from_text_tokenizer(tokenizer, data.speech_codebook_size,
                                             data.image_codebook_size)
    return vocab, tokenizer
