"""Text-only chat exchanges whose answers are computed, so they are always right.

Arithmetic, spelling, counting letters, a few facts about the demo's shapes and colours, and
greetings; one to three exchanges per conversation.
"""

from __future__ import annotations

import numpy as np

WORDS = ("circle", "square", "triangle", "star", "diamond", "rocket", "coffee", "camera",
         "horse", "galaxy", "garden", "window", "planet", "yellow", "purple", "orange")
SIDES = {"triangle": "three", "square": "four", "diamond": "four", "pentagon": "five",
         "hexagon": "six"}
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple",
         ("red", "white"): "pink", ("black", "white"): "grey"}
GREETINGS = (("Hello!", "Hello! How can I help you today?"),
             ("Hi, who are you?", "I am a small demo assistant that can read and draw pictures "
                                  "and listen and speak."),
             ("Thank you!", "You are welcome."))


def _arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(0, 50, size=2))
    op = rng.integers(3)
    if op == 0:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if op == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    a, b = a % 13, b % 13
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."


def _spelling(rng: np.random.Generator) -> tuple[str, str]:
    word = str(rng.choice(WORDS))
    kind = rng.integers(3)
    if kind == 0:
        return f"Spell the word {word}.", " ".join(word.upper())
    if kind == 1:
        return f"Write {word} backwards.", word[::-1]
    return f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."


def _facts(rng: np.random.Generator) -> tuple[str, str]:
    if rng.random() < 0.5:
        shape = str(rng.choice(list(SIDES)))
        return f"How many sides does a {shape} have?", f"A {shape} has {SIDES[shape]} sides."
    (first, second), mixed = list(MIXES.items())[rng.integers(len(MIXES))]
    return (f"What color do you get when you mix {first} and {second}?",
            f"Mixing {first} and {second} gives {mixed}.")


def _greeting(rng: np.random.Generator) -> tuple[str, str]:
    return GREETINGS[rng.integers(len(GREETINGS))]


TOPICS = (_arithmetic, _spelling, _facts, _greeting)


def random_exchanges(rng: np.random.Generator) -> list[tuple[str, str]]:
    """One to three ``(user, assistant)`` exchanges on random topics."""
    count = int(rng.choice([1, 1, 2, 3]))
    return [TOPICS[rng.integers(len(TOPICS))](rng) for _ in range(count)]
