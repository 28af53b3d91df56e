"""The world's words: objects (some with synonyms), colours, caption templates and the tokenizer."""
from __future__ import annotations

import random
from typing import List, Sequence

import torch

OBJECTS = ("circle", "square", "triangle", "cross", "ring")
SYNONYMS = {"circle": ("disc",), "square": ("box",), "cross": ("plus",)}
COLOURS = ("red", "green", "blue", "yellow")
TEMPLATES = ("a {colour} {object}", "{colour} {object}", "a {object}", "{object}")
COLOURLESS_TEMPLATES = tuple(t for t in TEMPLATES if "{colour}" not in t)

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
WORDS = (PAD, BOS, EOS, "a") + COLOURS + OBJECTS + tuple(w for o in OBJECTS for w in SYNONYMS.get(o, ()))
TOKEN_IDS = {w: i for i, w in enumerate(WORDS)}
CONTEXT_LENGTH = 8  # <bos> + up to 3 words + <eos>, padded


def words_for(obj: str) -> Sequence[str]:
    """The object's own word followed by its synonyms."""
    return (obj,) + SYNONYMS.get(obj, ())


def caption(obj_word: str, colour: str | None = None, template: str | None = None) -> str:
    if template is None:
        template = TEMPLATES[0] if colour is not None else TEMPLATES[2]
    return template.format(colour=colour, object=obj_word)


def random_caption(rng: random.Random, obj: str, colour: str, synonym_p: float = 0.3,
                   colourless_p: float = 0.25) -> str:
    """A training caption for a rendered (object, colour): sometimes a synonym, sometimes without the colour."""
    word = obj
    if obj in SYNONYMS and rng.random() < synonym_p:
        word = rng.choice(SYNONYMS[obj])
    if rng.random() < colourless_p:
        return rng.choice(COLOURLESS_TEMPLATES).format(object=word)
    return rng.choice([t for t in TEMPLATES if "{colour}" in t]).format(colour=colour, object=word)


def tokenize(captions: Sequence[str]) -> torch.Tensor:
    """[len(captions), CONTEXT_LENGTH] token ids; unknown words are refused (the vocabulary is closed)."""
    rows: List[List[int]] = []
    for text in captions:
        words = text.split()
        unknown = [w for w in words if w not in TOKEN_IDS or w in (PAD, BOS, EOS)]
        if unknown:
            raise ValueError(f"caption {text!r}: unknown word(s) {unknown}; the world knows {WORDS[3:]}")
        if len(words) + 2 > CONTEXT_LENGTH:
            raise ValueError(f"caption {text!r} is longer than {CONTEXT_LENGTH - 2} words")
        ids = [TOKEN_IDS[BOS]] + [TOKEN_IDS[w] for w in words] + [TOKEN_IDS[EOS]]
        rows.append(ids + [TOKEN_IDS[PAD]] * (CONTEXT_LENGTH - len(ids)))
    return torch.tensor(rows, dtype=torch.long)
