"""A world's words: objects (some with synonyms), colours, caption templates and the tokenizer.

Each world has its own Vocabulary (its spec's objects, synonyms and colours); DEFAULT is the one the demo, deep and
large worlds share, and the module-level names below are DEFAULT's, as they were before worlds could differ.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

TEMPLATES = ("a {colour} {object}", "{colour} {object}", "a {object}", "{object}")
COLOURLESS_TEMPLATES = tuple(t for t in TEMPLATES if "{colour}" not in t)
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CONTEXT_LENGTH = 8  # <bos> + up to 3 words + <eos>, padded


@dataclass(frozen=True)
class Vocabulary:
    objects: Tuple[str, ...]
    colours: Tuple[str, ...]
    synonyms: Tuple[Tuple[str, ...], ...] = ()  # (object, synonym, ...) per object that has any
    words: Tuple[str, ...] = field(init=False, compare=False)
    token_ids: Dict[str, int] = field(init=False, compare=False, hash=False)

    def __post_init__(self):
        extra = tuple(w for o in self.objects for w in self.synonyms_of(o))
        # Token ids follow this order; the committed worlds' files depend on it.
        words = (PAD, BOS, EOS, "a") + self.colours + self.objects + extra
        if len(set(words)) != len(words):
            raise ValueError(f"a vocabulary's words must be distinct: {words}")
        unknown = [entry[0] for entry in self.synonyms if entry[0] not in self.objects]
        if unknown:
            raise ValueError(f"synonyms for {unknown}, which are not among the objects {self.objects}")
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "token_ids", {w: i for i, w in enumerate(words)})

    @property
    def synonym_map(self) -> Dict[str, Tuple[str, ...]]:
        return {entry[0]: tuple(entry[1:]) for entry in self.synonyms}

    @property
    def known_words(self) -> Tuple[str, ...]:
        """The words a prompt may use (no special tokens)."""
        return self.words[3:]

    def synonyms_of(self, obj: str) -> Tuple[str, ...]:
        return self.synonym_map.get(obj, ())

    def words_for(self, obj: str) -> Sequence[str]:
        """The object's own word followed by its synonyms."""
        return (obj,) + self.synonyms_of(obj)

    def random_caption(self, rng: random.Random, obj: str, colour: str, synonym_p: float = 0.3,
                       colourless_p: float = 0.25) -> str:
        """A training caption for a rendered (object, colour): sometimes a synonym, sometimes without the colour."""
        word = obj
        synonyms = self.synonyms_of(obj)
        if synonyms and rng.random() < synonym_p:
            word = rng.choice(synonyms)
        if rng.random() < colourless_p:
            return rng.choice(COLOURLESS_TEMPLATES).format(object=word)
        return rng.choice([t for t in TEMPLATES if "{colour}" in t]).format(colour=colour, object=word)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """[len(captions), CONTEXT_LENGTH] token ids; unknown words are refused (the vocabulary is closed)."""
        rows: List[List[int]] = []
        for text in captions:
            words = text.split()
            unknown = [w for w in words if w not in self.token_ids or w in (PAD, BOS, EOS)]
            if unknown:
                raise ValueError(f"caption {text!r}: unknown word(s) {unknown}; the world knows {self.known_words}")
            if len(words) + 2 > CONTEXT_LENGTH:
                raise ValueError(f"caption {text!r} is longer than {CONTEXT_LENGTH - 2} words")
            ids = [self.token_ids[BOS]] + [self.token_ids[w] for w in words] + [self.token_ids[EOS]]
            rows.append(ids + [self.token_ids[PAD]] * (CONTEXT_LENGTH - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


DEFAULT = Vocabulary(objects=("circle", "square", "triangle", "cross", "ring"),
                     colours=("red", "green", "blue", "yellow"),
                     synonyms=(("circle", "disc"), ("square", "box"), ("cross", "plus")))

OBJECTS, COLOURS, WORDS, TOKEN_IDS = DEFAULT.objects, DEFAULT.colours, DEFAULT.words, DEFAULT.token_ids
SYNONYMS = DEFAULT.synonym_map
words_for, random_caption, tokenize = DEFAULT.words_for, DEFAULT.random_caption, DEFAULT.tokenize


def caption(obj_word: str, colour: str | None = None, template: str | None = None) -> str:
    if template is None:
        template = TEMPLATES[0] if colour is not None else TEMPLATES[2]
    return template.format(colour=colour, object=obj_word)
