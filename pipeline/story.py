"""Story types and ``story.json``, the contract between generation, editing and evaluation.

A story folder looks like::

    story.json            # this schema, version 1
    frames/frame_00.png   # Frame.image paths are relative to the folder

``story.json``::

    {
      "version": 1,
      "metadata": {...},          # free-form JSON: seed, timings, model ids, ...
      "frames": [
        {"index": 0, "story_caption": "...", "description": "...",
         "image": "frames/frame_00.png", "source": "seed"},
        ...
      ]
    }

``Story.from_json(story.to_json()) == story`` holds for every valid story (tested).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pipeline.errors import DataError
from pipeline.io import atomic_write_json

STORY_JSON_VERSION = 1
STORY_JSON_NAME = "story.json"

FrameSource = Literal["seed", "generated", "edited", "inserted"]
FRAME_SOURCES: tuple[str, ...] = get_args(FrameSource)
_FRAME_KEYS = ("index", "story_caption", "description", "image", "source")


@dataclass
class Frame:
    """One panel of a story.

    ``description`` is the literal description of the image (the diffusion prompt); it is ``None``
    until a captioner or a dataset provides one. ``image`` is a path relative to the story folder.
    """

    index: int
    story_caption: str
    description: str | None
    image: str
    source: FrameSource

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise ValueError(f"Frame.index must be a non-negative integer, got {self.index!r}")
        if self.source not in FRAME_SOURCES:
            raise ValueError(f"Frame.source must be one of {FRAME_SOURCES}, got {self.source!r}")
        if not isinstance(self.story_caption, str):
            raise ValueError(f"Frame.story_caption must be a string, got {self.story_caption!r}")
        if self.description is not None and not isinstance(self.description, str):
            raise ValueError(f"Frame.description must be a string or null, got {self.description!r}")
        if not isinstance(self.image, str) or Path(self.image).is_absolute():
            raise ValueError(f"Frame.image must be a path relative to the story folder, got {self.image!r}")

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _FRAME_KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Frame:
        missing = [key for key in _FRAME_KEYS if key not in data]
        unknown = [key for key in data if key not in _FRAME_KEYS]
        if missing or unknown:
            raise ValueError(
                f"frame keys: missing {missing}, unknown {unknown}; expected exactly {list(_FRAME_KEYS)}"
            )
        return cls(**{key: data[key] for key in _FRAME_KEYS})


@dataclass
class Story:
    """An ordered list of frames plus free-form JSON metadata (seed, timings, model ids...)."""

    frames: list[Frame]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        indices = [frame.index for frame in self.frames]
        if indices != list(range(len(self.frames))):
            raise ValueError(f"frame indices must be 0..{len(self.frames) - 1} in order, got {indices}")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STORY_JSON_VERSION,
            "metadata": self.metadata,
            "frames": [frame.to_dict() for frame in self.frames],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Story:
        if not isinstance(data, dict):
            raise ValueError(f"story.json must hold an object, got {type(data).__name__}")
        version = data.get("version")
        if version != STORY_JSON_VERSION:
            raise ValueError(
                f"unsupported story.json version {version!r}; this storypipe reads version {STORY_JSON_VERSION}"
            )
        unknown = set(data) - {"version", "metadata", "frames"}
        if unknown:
            raise ValueError(f"unknown top-level keys {sorted(unknown)}")
        frames = data.get("frames")
        if not isinstance(frames, list):
            raise ValueError("'frames' must be a list")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ValueError("'metadata' must be an object")
        return cls(frames=[Frame.from_dict(frame) for frame in frames], metadata=metadata)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/story.json`` atomically."""
        return atomic_write_json(Path(folder) / STORY_JSON_NAME, self.to_json())

    @classmethod
    def load(cls, folder: str | Path) -> Story:
        path = Path(folder) / STORY_JSON_NAME
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: is {folder} a story folder written by `storypipe generate`?"
            )
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            raise DataError(f"{path} is not a valid story.json: {exc}") from exc
