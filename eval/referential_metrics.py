"""Referential accuracy of predicted descriptions on ShapeStories: who does "she" refer to?

ShapeStories' story captions name a character at first mention and say "he", "she" or "they" when the
previous frame shows the same actors (Make-A-Story's referential text), while its descriptions name
every actor literally by colour and shape ("A red circle waves hello ..."). The description captioner
sees frame k and story captions k and k+1 and describes frame k+1; when caption k+1 only says "Then she
fell asleep.", the right description must resolve "she" from frame k.

Two per-frame accuracies, over predicted descriptions of frames whose true characters are all
ShapeStories characters (other datasets give no frames, and the scores are left out):

* ``character_named``: the description names exactly the frame's true characters (their DII nouns,
  ``Character.dii_noun``) and no other character;
* ``pronoun_resolution``: the same, over the frames whose true story caption names no character and
  whose subject, after the connective, is "he", "she" or "they".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeline.data.shapestories import BACKGROUNDS, CHARACTERS, CONNECTIVES

SUBJECT_PRONOUNS = ("he", "she", "they")
CHARACTER_NAMES = frozenset(character.name for character in CHARACTERS)
_NAME_PATTERN = re.compile(r"\b(" + "|".join(sorted(CHARACTER_NAMES)) + r")\b", re.IGNORECASE)
_NOUN_PATTERNS = {c.name: re.compile(rf"\b{re.escape(c.dii_noun)}\b", re.IGNORECASE) for c in CHARACTERS}
_BACKGROUND_PATTERNS = {
    b.name: re.compile(rf"\b{re.escape(b.dii_phrase)}\b", re.IGNORECASE) for b in BACKGROUNDS
}
_FIRST_WORD = re.compile(r"[A-Za-z]+")


def named_characters(description: str) -> set[str]:
    """The names of the ShapeStories characters whose DII noun ("red circle") the description contains."""
    return {name for name, pattern in _NOUN_PATTERNS.items() if pattern.search(description)}


def described_background(description: str) -> str | None:
    """The ShapeStories background whose DII phrase ("on a snowy field") the description contains, if exactly one."""
    found = [name for name, pattern in _BACKGROUND_PATTERNS.items() if pattern.search(description)]
    return found[0] if len(found) == 1 else None


def described_labels(description: str) -> dict[str, Any]:
    """The frame labels a ShapeStories description asks for: ``{"characters": [...], "background": ...}``."""
    return {
        "characters": sorted(named_characters(description)),
        "background": described_background(description),
    }


def is_pronoun_caption(caption: str) -> bool:
    """True when the caption names no character and its subject, after any connective, is he/she/they."""
    if _NAME_PATTERN.search(caption):
        return False
    text = caption.strip()
    for connective in CONNECTIVES:
        if text.lower().startswith(connective.lower()):
            text = text[len(connective) :]
            break
    first = _FIRST_WORD.search(text)
    return first is not None and first.group(0).lower() in SUBJECT_PRONOUNS


def shapestories_characters(labels: dict[str, Any] | None) -> list[str] | None:
    """The frame's true characters when they are all ShapeStories characters, else None."""
    characters = (labels or {}).get("characters")
    if not isinstance(characters, list) or not characters or not set(characters) <= CHARACTER_NAMES:
        return None
    return list(characters)


def referential_scores(
    descriptions: Sequence[str], captions: Sequence[str], labels: Sequence[dict[str, Any] | None]
) -> dict[str, float | int | None]:
    """``character_named`` and ``pronoun_resolution`` accuracies (None without frames) and their frame counts.

    Entry i describes the same frame as the true story caption ``captions[i]`` and its ``labels[i]``;
    frames whose labels are not all ShapeStories characters are skipped.
    """
    if not len(descriptions) == len(captions) == len(labels):
        raise ValueError(
            f"{len(descriptions)} descriptions, {len(captions)} captions and {len(labels)} labels: "
            "one of each per frame is needed"
        )
    named, pronoun = [], []
    for description, caption, frame_labels in zip(descriptions, captions, labels, strict=True):
        truth = shapestories_characters(frame_labels)
        if truth is None:
            continue
        correct = named_characters(description) == set(truth)
        named.append(correct)
        if is_pronoun_caption(caption):
            pronoun.append(correct)
    return {
        "pronoun_resolution": sum(pronoun) / len(pronoun) if pronoun else None,
        "pronoun_frames": len(pronoun),
        "character_named": sum(named) / len(named) if named else None,
        "character_frames": len(named),
    }
