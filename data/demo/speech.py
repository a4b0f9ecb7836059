"""Real speech for the demo dataset: Debian's ``espeak-ng`` when installed, else a word library.

``espeak-ng`` says any sentence, with a voice, speed and pitch drawn per utterance. Without it,
utterances are spliced from one recording per word committed under ``data/demo/speech/`` (made
by espeak-ng with ``python -m omnidiff.data.demo.speech``), so the demo works on any machine.
Everything comes out as 16 kHz mono float32 in [-1, 1].
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from omnidiff import UserError

SAMPLE_RATE = 16_000
LIBRARY_DIR = Path(__file__).parent / "speech"
Backend = Literal["auto", "espeak", "library"]


class SpeechError(UserError, RuntimeError):
    """Speech cannot be made: no backend, or a word missing from the word library."""


class Synthesizer(Protocol):
    name: str

    def __call__(self, text: str, rng: np.random.Generator) -> np.ndarray: ...


def words_of(text: str) -> list[str]:
    """Lower-case words without punctuation: what the word library is keyed by."""
    return re.findall(r"[a-z']+", text.lower())


def _finish(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pad with a little silence and set a random loudness, so utterances differ."""
    lead, trail = (int(SAMPLE_RATE * s) for s in rng.uniform(0.05, 0.25, size=2))
    audio = np.concatenate([np.zeros(lead), audio, np.zeros(trail)])
    peak = np.abs(audio).max()
    if peak == 0:
        raise SpeechError("synthesised audio is silent")
    return (audio * (rng.uniform(0.5, 0.9) / peak)).astype(np.float32)


class EspeakSynthesizer:
    """Whole sentences from the ``espeak-ng`` program (22.05 kHz, resampled to 16 kHz)."""

    name = "espeak-ng"
    VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+f2", "en-us+m3", "en-gb-x-rp+f4")

    def __init__(self) -> None:
        self.program = shutil.which("espeak-ng")
        if self.program is None:
            raise SpeechError("espeak-ng is not installed (apt-get install espeak-ng)")

    def say(self, text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
        """The raw utterance at 16 kHz (no padding, original loudness)."""
        result = subprocess.run(
            [self.program, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
            capture_output=True, check=False)
        if result.returncode != 0 or not result.stdout:
            raise SpeechError(f"espeak-ng failed on {text!r}: {result.stderr.decode().strip()}")
        audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float64")
        return resample_poly(audio, SAMPLE_RATE, rate) if rate != SAMPLE_RATE else audio

    def __call__(self, text: str, rng: np.random.Generator) -> np.ndarray:
        voice = self.VOICES[rng.integers(len(self.VOICES))]
        return _finish(self.say(text, voice, int(rng.integers(135, 186)), int(rng.integers(30, 71))),
                       rng)


class WordLibrarySynthesizer:
    """Utterances spliced from one 16 kHz recording per word, with random pauses between words."""

    name = "word-library"

    def __init__(self, directory: Path = LIBRARY_DIR) -> None:
        self.words = {path.stem: sf.read(path, dtype="float64")[0]
                      for path in sorted(Path(directory).glob("*.wav"))}
        if not self.words:
            raise SpeechError(f"no word recordings (*.wav) in {directory}")

    def __call__(self, text: str, rng: np.random.Generator) -> np.ndarray:
        words = words_of(text)
        missing = sorted({w for w in words if w not in self.words})
        if missing or not words:
            raise SpeechError(f"the speech word library cannot say {missing or text!r}")
        pieces = []
        for word in words:
            pieces.append(self.words[word])
            pieces.append(np.zeros(int(SAMPLE_RATE * rng.uniform(0.03, 0.12))))
        return _finish(np.concatenate(pieces[:-1]), rng)


def make_synthesizer(backend: Backend = "auto") -> Synthesizer:
    """``auto``: espeak-ng if installed, else the committed word library."""
    if backend == "espeak" or (backend == "auto" and shutil.which("espeak-ng")):
        return EspeakSynthesizer()
    if backend in ("auto", "library"):
        return WordLibrarySynthesizer()
    raise SpeechError(f"unknown speech backend {backend!r} (auto, espeak, library)")


def encode_flac(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def build_word_library(words: set[str], directory: Path = LIBRARY_DIR) -> int:
    """Record every word with espeak-ng (one neutral voice), trimmed; returns the bytes written."""
    synth = EspeakSynthesizer()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.wav"):
        stale.unlink()
    total = 0
    for word in sorted(words):
        audio = synth.say(word, "en-us", 165, 50)
        loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
        margin = int(0.01 * SAMPLE_RATE)
        audio = audio[max(loud[0] - margin, 0):loud[-1] + margin]
        path = directory / f"{word}.wav"
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
        total += path.stat().st_size
    return total


if __name__ == "__main__":
    from omnidiff.data.demo.tasks import speech_vocabulary

    size = build_word_library(speech_vocabulary())
    print(f"wrote {len(list(LIBRARY_DIR.glob('*.wav')))} words, {size / 1e6:.2f} MB to {LIBRARY_DIR}",
          file=sys.stderr)
