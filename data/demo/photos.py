"""Real photos from scikit-image's bundled data, with hand-written captions and light augmentation.

The pictures ship inside the scikit-image wheel, so nothing is downloaded. Each photo has a few
written captions, a short spoken phrase (words of the speech library only) and written
questions. Random crops (75-100 % of the short side), flips where they keep the caption true,
and small brightness / contrast / colour changes give every sample its own picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageEnhance
from skimage import data as skdata

SPOKEN_QUESTION = "what is in the picture"
SPOKEN_CAPTION = "a photo of {phrase}"


@dataclass(frozen=True)
class Photo:
    name: str  # the skimage.data loader
    captions: tuple[str, ...]
    phrase: str  # short, spoken
    questions: tuple[tuple[str, str], ...]
    flip: bool = True  # False where a mirror image would make the caption false (text)


PHOTOS = (
    Photo("astronaut", ("an astronaut in an orange space suit in front of a flag",
                        "a smiling astronaut in an orange suit holding a helmet"),
          "an astronaut", (("What color is the space suit?", "orange"),
                           ("Who is in the picture?", "an astronaut"))),
    Photo("coffee", ("a cup of coffee on a red saucer with a spoon",
                     "a red cup of coffee on a wooden table"),
          "a cup of coffee", (("What is in the cup?", "coffee"),
                              ("What color is the cup?", "red"))),
    Photo("chelsea", ("a close up of a tabby cat with green eyes",
                      "the face of an orange striped cat"),
          "a cat", (("What animal is this?", "a cat"), ("What color are the eyes?", "green"))),
    Photo("rocket", ("a rocket on a launch pad at night", "a rocket between towers under a dark blue sky"),
          "a rocket", (("What is standing on the launch pad?", "a rocket"),
                       ("Is it day or night?", "night"))),
    Photo("camera", ("a black and white photo of a man with a camera on a tripod",
                     "a photographer standing on a lawn with his camera"),
          "a man with a camera", (("What is the man holding?", "a camera"),
                                  ("Is the photo in color?", "no"))),
    Photo("coins", ("rows of old coins on a grey background", "a collection of silver coins"),
          "some coins", (("What is in the picture?", "coins"),
                         ("Are the coins in rows?", "yes"))),
    Photo("moon", ("the grey surface of the moon with craters", "craters on the moon"),
          "the moon", (("What is shown?", "the surface of the moon"),
                       ("Is the picture in color?", "no"))),
    Photo("hubble_deep_field", ("many galaxies in deep space", "a field of distant galaxies and stars"),
          "galaxies in space", (("What is in the picture?", "galaxies in space"),
                                ("What color is the background?", "black"))),
    Photo("retina", ("a photo of the back of a human eye with blood vessels",
                     "an orange retina with red blood vessels"),
          "an eye", (("What part of the body is this?", "the eye"),
                     ("What color is the retina?", "orange"))),
    Photo("grass", ("a close up of grass in black and white", "blades of grass"),
          "grass", (("What is in the picture?", "grass"),)),
    Photo("brick", ("a wall of grey bricks", "a brick wall in black and white"),
          "a brick wall", (("What is the wall made of?", "bricks"),)),
    Photo("gravel", ("a close up of small stones", "grey gravel seen from above"),
          "gravel", (("What is on the ground?", "gravel"),)),
    Photo("page", ("a page of printed text", "a page from a book about image segmentation"),
          "a page of text", (("What is on the page?", "printed text"),), flip=False),
    Photo("text", ("handwritten math on paper", "equations written by hand"),
          "some writing", (("What is written on the paper?", "math equations"),), flip=False),
    Photo("colorwheel", ("a color wheel on a black background", "a circle with all the colors"),
          "a color wheel", (("What shape is the color wheel?", "a circle"),)),
    Photo("horse", ("the black silhouette of a horse on a white background", "a horse shape in black"),
          "a horse", (("What animal is this?", "a horse"),
                      ("What color is the horse?", "black"))),
    Photo("stereo_motorcycle", ("a red motorcycle in a garage", "a red motorcycle parked next to shelves"),
          "a motorcycle", (("What vehicle is this?", "a motorcycle"),
                           ("What color is the motorcycle?", "red"))),
    Photo("immunohistochemistry", ("cells under a microscope, stained brown and blue",
                                   "a microscope image of tissue"),
          "cells", (("What is shown?", "cells under a microscope"),)),
)


def speech_words() -> set[str]:
    """Every word a spoken photo text can use (for the speech word library)."""
    words = set(SPOKEN_QUESTION.split())
    for photo in PHOTOS:
        words.update(SPOKEN_CAPTION.format(phrase=photo.phrase).split())
    return words


@lru_cache(maxsize=None)
def _original(name: str, size: int) -> Image.Image:
    """The photo as RGB, short side at most ``2 * size`` (cheap crops); loaded once per process."""
    array = getattr(skdata, name)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255  # False is the horse: black on white
    image = Image.fromarray(array).convert("RGB")
    scale = 2 * size / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BICUBIC)
    return image


def augmented_photo(photo: Photo, rng: np.random.Generator, size: int = 256) -> Image.Image:
    """A random square crop of the photo, resized to ``size``, lightly jittered."""
    image = _original(photo.name, size)
    width, height = image.size
    side = int(min(width, height) * rng.uniform(0.75, 1.0))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    if photo.flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.85, 1.15))
