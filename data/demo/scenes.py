"""Rendered scenes of coloured shapes, with captions and questions that are true by construction.

One shape (``a large red circle``) or two shapes in a spatial relation (``a red circle above a
blue square``). Two-shape scenes always use two different colours and two different shapes, so
every question names exactly one thing. All wording comes from the closed word lists below, so
the speech word library can say every spoken text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 35), "green": (35, 160, 55), "blue": (35, 75, 220), "yellow": (240, 210, 25),
    "orange": (245, 135, 20), "purple": (130, 45, 170), "pink": (245, 120, 180),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = {"small": (0.08, 0.13), "large": (0.22, 0.30)}  # radius as a fraction of the side
RELATIONS = ("above", "below", "to the left of", "to the right of")
NUMBER_WORDS = ("one", "two")
BACKGROUNDS = ((250, 250, 250), (235, 235, 235), (245, 240, 225), (225, 235, 245))
SINGLE_SHAPE_FRACTION = 0.6  # the rest are two-shape scenes

CAPTION_QUESTIONS = ("Describe the image.", "What is in this picture?",
                     "Write a short caption for this image.", "What do you see?")
SPOKEN_QUESTIONS = ("what color is the {shape}", "which shape is {color}",
                    "how many shapes are there", "where is the {color} {shape}")


@dataclass(frozen=True)
class Item:
    color: str
    shape: str
    size: str = ""

    @property
    def phrase(self) -> str:
        words = [w for w in (self.size, self.color, self.shape) if w]
        return " ".join([article(words[0]), *words])


@dataclass(frozen=True)
class Scene:
    """What a rendered scene shows: one item, or two items with ``first {relation} second``."""

    items: tuple[Item, ...]
    relation: str = ""

    @property
    def caption(self) -> str:
        if len(self.items) == 1:
            return self.items[0].phrase
        first, second = self.items
        return f"{first.phrase} {self.relation} {second.phrase}"

    @property
    def questions(self) -> list[tuple[str, str]]:
        """Written VQA pairs (question, answer)."""
        if len(self.items) == 1:
            item = self.items[0]
            return [("What color is the shape?", item.color),
                    ("What shape is in the picture?", f"a {item.shape}"),
                    (f"Is the {item.shape} small or large?", item.size),
                    ("How many shapes are there?", "one")]
        first, second = self.items
        return [(f"What color is the {first.shape}?", first.color),
                (f"Which shape is {second.color}?", f"the {second.shape}"),
                (f"Where is the {first.color} {first.shape}?",
                 f"{self.relation} the {second.color} {second.shape}"),
                (f"What is {self.relation} the {second.color} {second.shape}?", first.phrase),
                ("How many shapes are there?", "two")]

    @property
    def spoken_questions(self) -> list[tuple[str, str]]:
        """Spoken VQA pairs: questions and full-sentence answers, words of the library only."""
        first = self.items[0]
        count = len(self.items)
        pairs = [(f"what color is the {first.shape}", f"the {first.shape} is {first.color}"),
                 (f"which shape is {first.color}", f"the {first.shape} is {first.color}"),
                 ("how many shapes are there",
                  "there is one shape" if count == 1 else "there are two shapes")]
        if count == 2:
            second = self.items[1]
            pairs.append((f"where is the {first.color} {first.shape}",
                          f"the {first.color} {first.shape} is {self.relation} "
                          f"the {second.color} {second.shape}"))
        return pairs


def caption_attributes(text: str) -> dict[str, str]:
    """The first colour and the first shape word a text names (``color`` / ``shape`` keys, only
    those it names): what a caption of a scene must read from the image. Chance for a model
    that does not look: 1 / 8 for the colour, 1 / 5 for the shape."""
    words = re.findall(r"[a-z]+", text.lower())
    found = {}
    for name, vocabulary in (("color", COLORS), ("shape", SHAPES)):
        word = next((w for w in words if w in vocabulary), None)
        if word is not None:
            found[name] = word
    return found


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes (the inverse of :attr:`Scene.caption`, case and a final
    full stop aside), or None for text that is not a scene caption (photos, chat)."""
    item = rf"(?:an? )?(?:({'|'.join(SIZES)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    found = re.fullmatch(rf"{item}(?: ({'|'.join(RELATIONS)}) {item})?",
                         " ".join(text.lower().rstrip(".").split()))
    if found is None:
        return None
    size, color, shape, relation, *second = found.groups()
    items = (Item(color, shape, size or ""),)
    if relation:
        items += (Item(second[1], second[2], second[0] or ""),)
    return Scene(items, relation or "")


def image_colors(pixels: np.ndarray) -> Counter[str]:
    """Pixels per palette colour in an ``[H, W, 3]`` RGB image (0-255): those nearer to the
    colour than to any other palette colour and to every background. Reads which colours a
    generated scene shows; anti-aliased edges and decoder blur fall to the nearer background."""
    pixels = np.asarray(pixels, dtype=np.float64)[:, :, None, :]
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    to_color = ((pixels - palette) ** 2).sum(-1)
    to_background = ((pixels - np.array(BACKGROUNDS, dtype=np.float64)) ** 2).sum(-1).min(-1)
    shown = to_color.min(-1) < to_background
    counts = np.bincount(to_color.argmin(-1)[shown], minlength=len(COLORS))
    return Counter({name: int(n) for name, n in zip(COLORS, counts) if n})


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def speech_words() -> set[str]:
    """Every word a spoken scene text can use (for the speech word library)."""
    words = {"a", "an", "the", "is", "are", "there", "shape", "shapes", *COLORS, *SHAPES, *SIZES,
             *NUMBER_WORDS}
    for text in (*RELATIONS, *SPOKEN_QUESTIONS):
        words.update(w for w in text.split() if not w.startswith("{"))
    return words


def random_scene(rng: np.random.Generator) -> Scene:
    if rng.random() < SINGLE_SHAPE_FRACTION:
        return Scene((Item(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)),
                           str(rng.choice(list(SIZES)))),))
    colors = rng.choice(list(COLORS), size=2, replace=False)
    shapes = rng.choice(SHAPES, size=2, replace=False)
    return Scene((Item(str(colors[0]), str(shapes[0])), Item(str(colors[1]), str(shapes[1]))),
                 str(rng.choice(RELATIONS)))


def render_scene(scene: Scene, rng: np.random.Generator, size: int = 256) -> Image.Image:
    """Draw at 2x and downsample (PIL draws without anti-aliasing)."""
    big = 2 * size
    background = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    image = Image.new("RGB", (big, big), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    for item, (cx, cy, radius) in zip(scene.items, _layout(scene, rng)):
        color = np.clip(np.array(COLORS[item.color]) + rng.integers(-15, 16, size=3), 0, 255)
        _draw_shape(draw, item.shape, cx * big, cy * big, radius * big, tuple(int(c) for c in color),
                    float(rng.uniform(-0.3, 0.3)))
    return image.reduce(2)


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Centres and radii (fractions of the side) that make the caption's relation true."""
    if len(scene.items) == 1:
        low, high = SIZES[scene.items[0].size]
        radius = rng.uniform(low, high)
        cx, cy = rng.uniform(radius + 0.03, 1 - radius - 0.03, size=2)
        return [(cx, cy, radius)]
    radii = rng.uniform(0.11, 0.17, size=2)
    along = sorted(rng.uniform(0.2, 0.8, size=2))  # first < second along the relation's axis
    while along[1] - along[0] < radii.sum() + 0.04:
        along = sorted(rng.uniform(0.2, 0.8, size=2))
    across = rng.uniform(0.3, 0.7) + rng.uniform(-0.06, 0.06, size=2)
    if scene.relation in ("below", "to the right of"):
        along = along[::-1]
    if scene.relation in ("above", "below"):
        return [(across[i], along[i], radii[i]) for i in range(2)]
    return [(along[i], across[i], radii[i]) for i in range(2)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                color: tuple[int, int, int], tilt: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        return
    if shape == "square":
        points = _polygon(4, r * math.sqrt(2), math.pi / 4 + tilt * 0.3)
    elif shape == "diamond":
        points = [(x * 0.75, y) for x, y in _polygon(4, r, 0.0)]
    elif shape == "triangle":
        points = _polygon(3, r * 1.15, -math.pi / 2 + tilt * 0.3)
    else:  # star
        outer = _polygon(5, r * 1.1, -math.pi / 2)
        inner = _polygon(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        points = [p for pair in zip(outer, inner) for p in pair]
    draw.polygon([(cx + x, cy + y) for x, y in points], fill=color)


def _polygon(sides: int, radius: float, start: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(start + 2 * math.pi * k / sides),
             radius * math.sin(start + 2 * math.pi * k / sides)) for k in range(sides)]
