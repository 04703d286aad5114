"""Make-A-Story's referential ("extended") text: a repeated character's name becomes a pronoun.

Make-A-Story's extended FlintstonesSV / PororoSV replace a character's name by "he"/"she" when the
previous frame shows the same character, so a caption can only be resolved with the frames before it.
Our rule, applied to each caption after the first:

* **Candidates** are the characters of the *previous* frame (its ground-truth labels) that have an entry
  in the pronoun table.
* **One replacement per caption**: only the first mention of any candidate is replaced; later mentions
  (of it or of another candidate) keep their names, so the sentence stays readable and unambiguous.
  Matching is whole-word and case-insensitive ("fred", "Fred", "FRED"; not "Frederick"); ``aliases``
  lists other surface forms ("Mr. Slate", "Mr Slate" for ``slate``), tried longest first.
* **Pairs**: "Fred and Barney" where both are candidates becomes "they" (one mention).
* **Form**: a possessive ("Fred's hat") becomes "his"/"her"/"its"/"their"; a singular "Fred's" followed
  by a word ending in "-ing" or by a word in ``IS_CONTRACTION_CUES`` ("Fred's going", "Fred's a ...")
  is read as "Fred is" and becomes "he's". Otherwise the subject form ("he") is used at the start of a
  sentence, after ``, ; :`` and after a word in ``SUBJECT_CUES`` ("then", "and", "while", ...); anywhere
  else the object form ("him"). This is a heuristic, not a parser: "hugs Betty and Fred" gives
  "hugs Betty and he".
* **Capitalisation**: capitalised at the start of the caption or of a sentence ("He", "His"), lower
  case elsewhere ("Then he ...").

The first caption is never changed (there is no previous frame).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

# --------------------------------------------------------------------------------------------
# Pronouns
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PronounForms:
    subject: str  # "he"
    object: str  # "him"
    possessive: str  # "his" (the determiner: "his hat")


PRONOUN_FORMS: Mapping[str, PronounForms] = MappingProxyType(
    {
        "he": PronounForms("he", "him", "his"),
        "she": PronounForms("she", "her", "her"),
        "it": PronounForms("it", "it", "its"),
        "they": PronounForms("they", "them", "their"),
    }
)
PLURAL_PRONOUN = "they"

# Subject pronoun per character (lower-case label names, as in our frame labels). The female
# characters are those Make-A-Story's data loaders list as female; every other one is "he".
FLINTSTONES_PRONOUNS: Mapping[str, str] = MappingProxyType(
    {
        "fred": "he",
        "wilma": "she",
        "barney": "he",
        "betty": "she",
        "pebbles": "she",
        "dino": "he",
        "slate": "he",
    }
)
PORORO_PRONOUNS: Mapping[str, str] = MappingProxyType(
    {
        "pororo": "he",
        "loopy": "she",
        "crong": "he",
        "eddy": "he",
        "poby": "he",
        "petty": "she",
        "harry": "he",
        "tongtong": "he",
        "rody": "he",
    }
)
# Other ways captions name a character (Flintstones captions say "Mr. Slate" or "Mr Slate").
FLINTSTONES_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({"slate": ("mr. slate", "mr slate")})
PORORO_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({})

# --------------------------------------------------------------------------------------------
# Grammar cues
# --------------------------------------------------------------------------------------------

# A mention right after one of these words (or after , ; :) is taken as a subject.
SUBJECT_CUES = frozenset(
    {
        "and",
        "but",
        "or",
        "then",
        "while",
        "when",
        "whilst",
        "as",
        "so",
        "because",
        "although",
        "though",
        "whereas",
        "meanwhile",
        "now",
        "also",
        "suddenly",
        "finally",
        "later",
        "next",
    }
)
# "NAME's" followed by one of these (or by a word ending in "-ing") means "NAME is".
IS_CONTRACTION_CUES = frozenset({"a", "an", "the", "not", "been", "very", "so", "about", "in", "on", "at"})
IS_CONTRACTION = "'s"
PLURAL_JOINER = re.compile(r"\s+and\s+", re.IGNORECASE)
POSSESSIVE_SUFFIX = re.compile(r"['\u2019]s\b", re.IGNORECASE)
NEXT_WORD = re.compile(r"\s+([A-Za-z]+)")
PREVIOUS_WORD = re.compile(r"([A-Za-z]+)\s*$")
CLAUSE_PUNCTUATION = re.compile(r"[,;:]\s*$")
# The text before a sentence start: nothing, or sentence-final punctuation (plus closing quotes or
# brackets) and white space, then any opening quotes or brackets.
SENTENCE_START = re.compile(r"(?:^|[.!?][\"'\u201d\u2019)\]]*\s)[\s\"'\u201c\u2018(\[]*$")
ING_SUFFIX = "ing"


def referential_captions(
    captions: Sequence[str],
    characters_per_frame: Sequence[Collection[str]],
    pronouns: Mapping[str, str],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Return ``captions`` with, in each caption after the first, the first mention of a character of
    the previous frame replaced by its pronoun (see the module docstring for the full rule).

    ``characters_per_frame[i]`` holds the character names of frame ``i`` (case-insensitive);
    ``pronouns`` maps a name to its subject pronoun (a key of ``PRONOUN_FORMS``); ``aliases`` maps a
    name to other ways captions write it. Characters without a pronoun are never replaced.
    """
    if len(captions) != len(characters_per_frame):
        raise ValueError(
            f"referential_captions needs one character set per caption, got {len(captions)} captions "
            f"and {len(characters_per_frame)} character sets"
        )
    table = {name.lower(): pronoun for name, pronoun in pronouns.items()}
    unknown = sorted({pronoun for pronoun in table.values() if pronoun not in PRONOUN_FORMS})
    if unknown:
        raise ValueError(f"unknown pronoun(s) {unknown}; expected some of {sorted(PRONOUN_FORMS)}")
    surface = _surface_forms(table, aliases or {})
    result = list(captions[:1])
    for index in range(1, len(captions)):
        previous = {name.lower() for name in characters_per_frame[index - 1]}
        candidates = [name for name in table if name in previous]  # pronoun-table order: deterministic
        result.append(_refer(captions[index], candidates, table, surface))
    return result


def _surface_forms(table: Mapping[str, str], aliases: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Lower-case surface form -> character name, for every name and alias in ``table``."""
    forms: dict[str, str] = {}
    for name in table:
        forms[name] = name
        for alias in aliases.get(name, ()):
            forms[alias.lower()] = name
    return forms


def _mention_pattern(forms: Collection[str]) -> re.Pattern[str]:
    """Whole-word, case-insensitive alternation of ``forms``, longest first ("mr. slate" before "slate")."""
    alternation = "|".join(re.escape(form) for form in sorted(forms, key=lambda f: (-len(f), f)))
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)


def _refer(caption: str, candidates: list[str], table: Mapping[str, str], surface: Mapping[str, str]) -> str:
    """Replace the first mention of a candidate in ``caption`` by its pronoun (or return it unchanged)."""
    if not candidates:
        return caption
    forms = [form for form, name in surface.items() if name in candidates]
    pattern = _mention_pattern(forms)
    first = pattern.search(caption)
    if first is None:
        return caption
    start, end = first.span()
    pronoun = table[surface[first.group(0).lower()]]

    # "Fred and Barney" with both candidates (and two different characters) -> "they".
    joiner = PLURAL_JOINER.match(caption, end)
    if joiner is not None:
        second = pattern.match(caption, joiner.end())
        if second is not None and surface[second.group(0).lower()] != surface[first.group(0).lower()]:
            end, pronoun = second.end(), PLURAL_PRONOUN
    forms_of = PRONOUN_FORMS[pronoun]

    before = caption[:start]
    at_sentence_start = SENTENCE_START.search(before) is not None
    possessive = POSSESSIVE_SUFFIX.match(caption, end)
    if possessive is not None:
        end = possessive.end()
        if pronoun != PLURAL_PRONOUN and _is_contraction(caption, end):
            replacement = forms_of.subject + IS_CONTRACTION
        else:
            replacement = forms_of.possessive
    elif at_sentence_start or _after_subject_cue(before):
        replacement = forms_of.subject
    else:
        replacement = forms_of.object
    if at_sentence_start:
        replacement = replacement[:1].upper() + replacement[1:]
    return caption[:start] + replacement + caption[end:]


def _is_contraction(caption: str, after: int) -> bool:
    """Whether the "'s" ending at ``after`` reads as "is": the next word ends in -ing or is a cue."""
    word = NEXT_WORD.match(caption, after)
    if word is None:
        return False
    text = word.group(1).lower()
    return text.endswith(ING_SUFFIX) or text in IS_CONTRACTION_CUES


def _after_subject_cue(before: str) -> bool:
    """Whether a mention following ``before`` starts a clause: after , ; : or a word in SUBJECT_CUES."""
    if CLAUSE_PUNCTUATION.search(before):
        return True
    word = PREVIOUS_WORD.search(before)
    return word is not None and word.group(1).lower() in SUBJECT_CUES
