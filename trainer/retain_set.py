"""The retain set the trainer finds: the concepts nearest to the one erased, which the preserve term then holds to
the original. Nobody has to guess that erasing "Van Gogh" puts "Monet" at risk.

Candidates (the user's list, the demo worlds' own words, or the pack's vocabulary, retain_vocabulary.txt) come
encoded with the user's CLIP and are ranked by how near their text encoding is to the concept's, relative to the
empty prompt's: the erasure's weight deltas act on these encodings, so the nearest move with the concept. A
candidate whose words include every word of a concept ("a red square" for "a square") is a variant of it and never
kept. The original model then judges the nearest SHORTLIST on the concept's own images (erasure_score.py's
held-out points, every noise level):

    distance(k) = sqrt( sum |eps(k) - eps(c)|^2 / sum |eps(u) - eps(c)|^2 ),   the nearest concept c

0: the model predicts for k what it predicts for the concept; 1: as differently as for the empty prompt. Below
SYNONYM a candidate is a synonym, erased with the concept and never kept. The `size` nearest of the rest are kept.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from .conditioning import Cond, Prompt, encode_text

VOCABULARY = Path(__file__).with_name("retain_vocabulary.txt")
SHORTLIST = 48  # candidates the model judges (the rest are ranked out by text alone)
SYNONYM = 0.5  # distance below which a candidate counts as a synonym of the concept
SAMPLES = 4  # the concept's own images the model judges candidates on (one is one colour, one pose)
CHUNK = 16  # candidates per forward batch
ARTICLES = {"a", "an", "the", "of", "by", "in", "on", "with", "and"}
STYLE_WORDS = {"style", "painting", "photo", "art", "drawing", "picture", "image"}  # "Van Gogh style" = "Van Gogh"


def shipped_vocabulary() -> List[str]:
    """The pack's candidate list: everyday objects, animals, people, places, styles and artists, one per line."""
    lines = VOCABULARY.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def candidate_texts(clip, user_list: str = "") -> Tuple[str, List[str]]:
    """(source, texts): the user's list if given, else the CLIP's own candidates (the demo worlds know only their
    words), else the shipped vocabulary."""
    users = [line.strip() for line in (user_list or "").splitlines() if line.strip()]
    if users:
        return "your list", users
    own = getattr(clip, "retain_candidates", None)
    if callable(own):
        return "the model's own words", list(own())
    return "the pack's vocabulary", shipped_vocabulary()


def words(text: str) -> set:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def is_variant(candidate: str, concepts: Sequence[str]) -> bool:
    """The candidate names a concept and more ("a red square" for "a square", "Van Gogh painting" for "Van Gogh")."""
    mine = words(candidate)
    for concept in concepts:
        theirs = words(concept) - ARTICLES
        theirs = theirs - STYLE_WORDS or theirs
        if theirs and theirs <= mine:
            return True
    return False


@dataclass
class RetainSet:
    source: str
    considered: int
    kept: List[Tuple[str, float]] = field(default_factory=list)       # (text, model distance), nearest text first
    synonyms: List[Tuple[str, float]] = field(default_factory=list)
    variants: List[str] = field(default_factory=list)
    kept_prompts: List[Prompt] = field(default_factory=list)

    def record(self) -> Dict[str, object]:
        return {"source": self.source, "considered": self.considered,
                "kept": [[t, round(d, 4)] for t, d in self.kept],
                "synonyms": [[t, round(d, 4)] for t, d in self.synonyms], "variants": self.variants}

    def describe(self) -> str:
        kept = ", ".join(f"{t} ({d:.2f})" for t, d in self.kept) or "none"
        synonyms = ", ".join(f"{t} ({d:.2f})" for t, d in self.synonyms) or "none"
        return (f"retain set from {self.source} ({self.considered} candidates): kept {kept}; synonyms, erased "
                f"with the concept: {synonyms}")


def _flat(context: torch.Tensor, length: int) -> torch.Tensor:
    return context[0, :length].flatten().float().cpu()


def text_distances(candidates: Sequence[Prompt], concepts: Sequence[Prompt], unconditional: Prompt) -> List[float]:
    """Each candidate's text encoding's distance to the nearest concept's, in units of the empty prompt's."""
    length = min(p.context.shape[1] for p in [*candidates, *concepts, unconditional])
    empty = _flat(unconditional.context, length)
    distances = []
    for cand in candidates:
        k = _flat(cand.context, length)
        best = math.inf
        for concept in concepts:
            c = _flat(concept.context, length)
            best = min(best, float((k - c).norm()) / (float((empty - c).norm()) or 1.0))
        distances.append(best)
    return distances


def model_distances(score, candidates: Sequence[Cond]) -> List[float]:
    """distance(k) for each encoded candidate, on the held-out points of `score` (a HeldOutScore)."""
    moved = torch.zeros(len(candidates), len(score.totals), dtype=torch.float64)
    with torch.no_grad():
        for j, _concept, x, sig, eps_c, _to_target in score.points:
            for start in range(0, len(candidates), CHUNK):
                part = list(candidates[start:start + CHUNK])
                n = len(part)
                eps = score.eps_batch(x.repeat(n, 1, 1, 1), sig.repeat(n), part)
                moved[start:start + n, j] += ((eps - eps_c) ** 2).flatten(1).sum(1).double().cpu()
    scale = torch.tensor([t / (1 + score.eta) ** 2 for t in score.totals], dtype=torch.float64).clamp(min=1e-12)
    return (moved / scale).sqrt().min(dim=1).values.tolist()


def choose(score, candidates: Sequence[Prompt], texts: Sequence[str], encode, concepts: Sequence[Prompt],
           unconditional: Prompt, concept_names: Sequence[str], source: str, size: int) -> RetainSet:
    """score: a HeldOutScore of the concepts; encode(prompts) -> conds for the model (encode_entries)."""
    chosen = RetainSet(source, len(texts))
    names = [n for n in concept_names if n]
    candidates_left = []
    for i, text in enumerate(texts):
        if names and is_variant(text, names):
            chosen.variants.append(text)
        else:
            candidates_left.append(i)
    near = text_distances([candidates[i] for i in candidates_left], concepts, unconditional)
    shortlist = [i for _, i in sorted(zip(near, candidates_left))][:SHORTLIST]
    if not shortlist:
        return chosen
    judged = model_distances(score, encode([candidates[i] for i in shortlist]))
    for i, distance in zip(shortlist, judged):
        if distance < SYNONYM:
            chosen.synonyms.append((texts[i], distance))
        elif len(chosen.kept) < size:
            chosen.kept.append((texts[i], distance))
            chosen.kept_prompts.append(candidates[i])
    return chosen


@dataclass
class Candidates:
    """What the retain set is chosen from: texts and their CONDITIONING entries (CLIP Text Encode's)."""

    source: str
    texts: List[str]
    entries: List[list]


def encode_candidates(clip, user_list: str = "") -> Candidates:
    """Each candidate as CLIP Text Encode gives it on this host; texts the CLIP refuses (a closed vocabulary) are
    dropped."""
    source, texts = candidate_texts(clip, user_list)
    kept_texts, entries = [], []
    for text in dict.fromkeys(texts):
        try:
            conditioning = encode_text(clip, text)
        except ValueError:
            continue
        kept_texts.append(text)
        entries.append(conditioning[0])
    return Candidates(source, kept_texts, entries)

