"""One demo sample per ``(task, index)``: messages (REFERENCE §2 prompts) plus encoded media.

A sample is what :class:`omnidiff.data.media.shards.ShardWriter` writes: the task, its messages with
``<image>`` / ``<speech>`` placeholders, and the media filling them in order: PNG (scenes) or
JPEG (photos) images and 16 kHz mono FLAC speech.
Every sample draws from its own generator seeded by ``(seed, task, index)``, so samples can be
made in any order or process and the dataset is still the same.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from PIL import Image

from omnidiff.data.tokens import sequences as seq
from omnidiff.data.demo import chat, photos, scenes
from omnidiff.data.demo.speech import Synthesizer, encode_flac
from omnidiff.data.tokens.sequences import TASKS

PHOTO_FRACTION = 0.3  # image tasks: the rest are rendered scenes
T = TypeVar("T")


@dataclass
class _Draft:
    """A sample being assembled: media are appended in placeholder order."""

    rng: np.random.Generator
    synth: Synthesizer
    image_size: int
    images: list[tuple[str, bytes]] = field(default_factory=list)
    speech: list[bytes] = field(default_factory=list)
    source: str = ""

    def add_image(self, image: Image.Image, lossless: bool) -> None:
        buffer = io.BytesIO()
        if lossless:
            image.save(buffer, format="PNG", optimize=False)
        else:
            image.save(buffer, format="JPEG", quality=90)
        self.images.append(("png" if lossless else "jpg", buffer.getvalue()))

    def add_speech(self, text: str) -> None:
        self.speech.append(encode_flac(self.synth(text, self.rng)))

    def subject(self, picture: bool = True) -> scenes.Scene | photos.Photo:
        """A random scene or photo; with ``picture`` its image is added to the sample."""
        if self.rng.random() < PHOTO_FRACTION:
            photo = self.choice(photos.PHOTOS)
            self.source = f"photo:{photo.name}"
            if picture:
                image = photos.augmented_photo(photo, self.rng, self.image_size)
                self.add_image(image, lossless=False)
            return photo
        scene = scenes.random_scene(self.rng)
        self.source = "scene"
        if picture:
            self.add_image(scenes.render_scene(scene, self.rng, self.image_size), lossless=True)
        return scene

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.integers(len(options))]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


def _written_caption(draft: _Draft, subject: scenes.Scene | photos.Photo) -> str:
    if isinstance(subject, photos.Photo):
        return draft.choice(subject.captions)
    return subject.caption


def _spoken_caption(subject: scenes.Scene | photos.Photo) -> str:
    if isinstance(subject, photos.Photo):
        return photos.SPOKEN_CAPTION.format(phrase=subject.phrase)
    return subject.caption


def _captioning(draft: _Draft) -> list[dict]:
    subject = draft.subject()
    return seq.captioning_messages(draft.choice(scenes.CAPTION_QUESTIONS),
                                   _sentence(_written_caption(draft, subject)))


def _vqa(draft: _Draft) -> list[dict]:
    subject = draft.subject()
    question, answer = draft.choice(subject.questions)
    return seq.captioning_messages(question, _sentence(answer))


def _text_to_image(draft: _Draft) -> list[dict]:
    subject = draft.subject()
    return seq.text_to_image_messages(_written_caption(draft, subject))


def _said_caption(draft: _Draft) -> str:
    """A spoken caption (no picture stored) whose speech is added to the sample."""
    text = _spoken_caption(draft.subject(picture=False))
    draft.add_speech(text)
    return text


def _asr(draft: _Draft) -> list[dict]:
    return seq.asr_messages(_said_caption(draft))


def _tts(draft: _Draft) -> list[dict]:
    return seq.tts_messages(_said_caption(draft))


def _speech_to_image(draft: _Draft) -> list[dict]:
    subject = draft.subject()
    draft.add_speech(_spoken_caption(subject))
    return seq.speech_to_image_messages()


def _spoken_vqa(draft: _Draft) -> list[dict]:
    subject = draft.subject()
    if isinstance(subject, photos.Photo):
        question, answer = photos.SPOKEN_QUESTION, subject.phrase
    else:
        question, answer = draft.choice(subject.spoken_questions)
    draft.add_speech(question)
    draft.add_speech(answer)
    return seq.spoken_vqa_messages(answer)


def _text(draft: _Draft) -> list[dict]:
    draft.source = "chat"
    return seq.chat_messages(chat.random_exchanges(draft.rng))


MAKERS: dict[str, Callable[[_Draft], list[dict]]] = {
    "captioning": _captioning, "vqa": _vqa, "text_to_image": _text_to_image, "asr": _asr,
    "tts": _tts, "speech_to_image": _speech_to_image, "spoken_vqa": _spoken_vqa, "text": _text,
}


@dataclass
class DemoSample:
    """One sample in the arguments of :meth:`omnidiff.data.media.shards.ShardWriter.write`."""

    key: str
    task: str
    messages: list[dict]
    images: list[tuple[str, bytes]]  # (extension, encoded), in placeholder order
    audios: list[tuple[str, bytes]]
    source: str  # "scene", "photo:<name>" or "chat": kept as metadata in the record


def make_sample(task: str, index: int, seed: int, synth: Synthesizer,
                image_size: int = 256) -> DemoSample:
    """Sample ``index`` of ``task``; the same arguments always give the same sample."""
    rng = np.random.default_rng([seed, TASKS.index(task), index])
    draft = _Draft(rng, synth, image_size)
    messages = MAKERS[task](draft)
    return DemoSample(f"{task}-{index:06d}", task, messages, draft.images,
                      [("flac", data) for data in draft.speech], draft.source)


def speech_vocabulary() -> set[str]:
    """Every word any spoken demo text uses: what the speech word library must hold."""
    return scenes.speech_words() | photos.speech_words()
