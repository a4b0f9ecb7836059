"""A demo text tokenizer: byte-level BPE fitted to the demo's own chat records.

The built-in byte tokenizer spells every word letter by letter, so a tiny model trained for a few
hundred steps must place ~20 bytes right to say "a red circle above a blue star."; real runs use
Dream's BPE tokenizer, which cannot be downloaded here. This fits a small one of the same kind
(byte-level BPE, so any text still encodes; the chat specials as added tokens) with Hugging Face
``tokenizers`` and saves it as a ``transformers`` tokenizer folder: ``data.text_tokenizer`` takes
it like Dream's.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from omnidiff.data.media.shards import expand_shard_specs
from omnidiff.data.tokens.sequences import IMAGE_PLACEHOLDER, SPEECH_PLACEHOLDER
from omnidiff.data.tokens.vocab import CHAT_SPECIALS, ENDOFTEXT

TOKENIZER_FILE = "tokenizer.json"
MIN_TEXT_VOCAB = 300  # the 256 byte symbols, the chat specials and some merges


def shard_texts(specs: Iterable[str | Path], limit: int) -> Iterator[str]:
    """The message texts (media placeholders removed) of up to ``limit`` samples' ``.json``
    members, shard by shard; unreadable members are passed over (fitting needs no error)."""
    count = 0
    for shard in expand_shard_specs(list(specs)):
        with tarfile.open(shard) as tar:
            for member in tar:
                if count >= limit:
                    return
                if not member.isfile() or not member.name.endswith(".json"):
                    continue
                try:
                    record = json.loads(tar.extractfile(member).read())
                    texts = [m["content"] for m in record["messages"]]
                except (ValueError, KeyError, TypeError):
                    continue
                count += 1
                for text in texts:
                    yield text.replace(IMAGE_PLACEHOLDER, " ").replace(SPEECH_PLACEHOLDER, " ")


def fit_text_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> Path:
    """Byte-level BPE of at most ``vocab_size`` entries (the four chat specials included) fitted
    to ``texts``, saved as a ``transformers`` tokenizer folder; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHAT_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=ENDOFTEXT,
                                      pad_token=ENDOFTEXT)
    out_dir = Path(out_dir)
    wrapped.save_pretrained(str(out_dir))
    return out_dir
