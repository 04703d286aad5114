"""Many stories from one seeds file: what ``storypipe generate-many`` and ``StoryPipeline.tell_many`` read.

A seeds file is JSON Lines, one story a line::

    {"image": "seeds/rosa.png", "caption": "Rosa waved hello.", "frames": 5, "seed": 1, "id": "rosa"}

``image`` and ``caption`` are required; ``description`` (the seed frame's), ``frames`` and ``seed`` default to
the config's (``story.frames``, ``story.seed``), and ``id`` (the story's folder under the output folder) to
``line-NNNNN``, the line's number. Image paths are relative to the seeds file's folder. Blank lines are
skipped. Every line is checked before any model loads; a bad one is a :class:`BadLine` naming
``file:line``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import StoryConfig
from pipeline.errors import InputError, StorypipeError
from pipeline.io import load_rgb
from pipeline.orchestrator import StoryTeller
from pipeline.story import PLAIN_NAME, PLAIN_NAME_RULE

FIELDS = ("image", "caption", "description", "frames", "seed", "id")
REQUIRED = ("image", "caption")


@dataclass(frozen=True)
class StorySeed:
    """One checked line of a seeds file: a story to tell into ``OUT/{id}/``."""

    id: str
    image: Path
    caption: str
    description: str | None
    frames: int
    seed: int
    where: str  # ``seeds.jsonl:3``, for messages


@dataclass(frozen=True)
class BadLine:
    where: str  # ``seeds.jsonl:3``
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


class BadLines(InputError):
    """Lines of a seeds file that cannot be told; the message names each one (``file:line: problem``)."""

    def __init__(self, bad: Sequence[BadLine]) -> None:
        self.bad = list(bad)
        listed = "\n".join(f"  {line}" for line in self.bad)
        count = f"{len(self.bad)} line{'s' if len(self.bad) > 1 else ''}"
        super().__init__(
            f"{count} of the seeds file cannot be told, so nothing was written:\n{listed}\n"
            "Fix them, or pass --skip-bad (skip_bad=True) to tell the other lines."
        )


def default_id(number: int) -> str:
    return f"line-{number:05d}"


def read_seeds(path: Path, cfg: StoryConfig) -> tuple[list[StorySeed], list[BadLine]]:
    """Every story of the seeds file at ``path``, and every bad line (each problem named with its line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the seeds file {path}: {exc}") from exc
    seeds: list[StorySeed] = []
    bad: list[BadLine] = []
    first_line_of: dict[str, str] = {}  # id -> where it was first seen
    numbered = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not numbered:
        raise InputError(f"the seeds file {path} holds no stories: one JSON object a line, e.g. {EXAMPLE}")
    for number, line in numbered:
        where = f"{path}:{number}"
        try:
            seed = _check_line(line, number, where, path.parent, cfg)
        except StorypipeError as exc:
            bad.append(BadLine(where, str(exc)))
            continue
        if seed.id in first_line_of:
            bad.append(
                BadLine(where, f"the id {seed.id!r} is also {first_line_of[seed.id]}'s; ids must be unique")
            )
            continue
        first_line_of[seed.id] = where
        seeds.append(seed)
    return seeds, bad


EXAMPLE = '{"image": "seed.png", "caption": "Rosa waved hello.", "frames": 5, "seed": 1, "id": "rosa"}'


def _check_line(line: str, number: int, where: str, folder: Path, cfg: StoryConfig) -> StorySeed:
    # 1. One JSON object with known fields.
    try:
        entry: Any = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"not valid JSON ({exc}); each line is one object, e.g. {EXAMPLE}") from exc
    if not isinstance(entry, dict):
        raise InputError(f"expected a JSON object, got {type(entry).__name__}; e.g. {EXAMPLE}")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise InputError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(FIELDS)}"
        )
    missing = [name for name in REQUIRED if entry.get(name) is None]
    if missing:
        raise InputError(f"missing {' and '.join(repr(name) for name in missing)}; e.g. {EXAMPLE}")

    # 2. The story's texts and settings, as `storypipe generate` checks them.
    caption, description, frames, seed = StoryTeller.check_begin(
        cfg, entry["caption"], entry.get("description"), entry.get("frames"), entry.get("seed")
    )

    # 3. Its id: a plain name, since it names the story's folder.
    story_id = entry.get("id", default_id(number))
    if not isinstance(story_id, str) or not PLAIN_NAME.fullmatch(story_id):
        raise InputError(
            f"the id {story_id!r} is not a plain name ({PLAIN_NAME_RULE}); it names the story's folder"
        )

    # 4. The seed image: a file that decodes, relative to the seeds file's folder.
    image = entry["image"]
    if not isinstance(image, str) or not image.strip():
        raise InputError(f"'image' must be a file path (a string), got {image!r}")
    image_path = folder / image
    if not image_path.is_file():
        raise InputError(
            f"the image {image_path} does not exist or is not a file (image paths are relative to the seeds "
            f"file's folder, {folder})"
        )
    load_rgb(image_path)  # a clear error when it does not decode
    return StorySeed(story_id, image_path, caption, description, frames, seed, where)


@dataclass(frozen=True)
class StoryOutcome:
    """What became of one story of a seeds file in this process."""

    seed: StorySeed
    folder: Path
    status: str  # "told" (new), "resumed" (continued from frame ``resumed_at``), "complete" (skipped)
    frames: int
    resumed_at: int | None = None
    batch_seconds: float = 0.0  # the wall time of the batch it was told in

    def line(self) -> str:
        """The story's summary line."""
        if self.status == "complete":
            return f"{self.seed.id}: already complete ({self.frames} frames), skipped"
        how = "told" if self.status == "told" else f"resumed at frame {self.resumed_at}"
        return f"{self.seed.id}: {self.frames} frames in {self.folder} ({how}; its batch took {self.batch_seconds:.1f}s)"


@dataclass(frozen=True)
class ManyStories:
    """The outcome of :meth:`storypipe.StoryPipeline.tell_many` in this process."""

    outcomes: list[StoryOutcome]  # this process's stories, in the seeds file's order
    bad: list[BadLine]  # the lines skipped (``skip_bad``); the same in every process
    shard: tuple[int, int]  # (this process, processes)
