"""Story types and ``story.json``, the contract between generation, editing and evaluation.

A :class:`Story` lives in memory: each :class:`Frame` holds its PIL image. ``story.save(folder)`` writes
the story folder a person opens (see :mod:`pipeline.story_folder`) and ``Story.load(folder)`` reads it
back. Frames are numbered from 0, the seed frame, everywhere: in ``story.json``, in the file names, in
the storyboards, and in the CLI's and the API's ``frame=`` / ``after=``.

``story.json``::

    {
      "version": 1,
      "metadata": {...},          # free-form JSON: seed, timings, the changes made to the story, ...
      "frames": [
        {"index": 0, "story_caption": "...", "description": "...",
         "image": "frames/frame_00.png", "source": "seed"},
        ...
      ]
    }

``Story.from_json(story.to_json())`` gives the story back without its images (tested).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from PIL import Image

from pipeline.seeds import SEED_BITS

STORY_JSON_VERSION = 1
STORY_JSON_NAME = "story.json"
FRAMES_DIR = "frames"
# A name that files and folders are named after (a story id): it cannot lead out of its folder or hide.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
PLAIN_NAME_RULE = "letters, digits, '.', '_' and '-', not starting with '.', at most 200 characters"
MIN_FRAMES, MAX_FRAMES = 2, 20  # frames in a told story, the seed included
MAX_SEED = 2**SEED_BITS - 1  # a story seed; every seed storypipe draws derives from it

FrameSource = Literal["seed", "generated", "edited", "inserted"]
FRAME_SOURCES: tuple[str, ...] = get_args(FrameSource)
_FRAME_KEYS = ("index", "story_caption", "description", "image", "source")


def frame_file(index: int) -> str:
    """Where frame ``index``'s image lives, relative to the story folder: ``frames/frame_00.png``."""
    return f"{FRAMES_DIR}/frame_{index:02d}.png"


@dataclass
class Frame:
    """One panel of a story.

    ``description`` is the literal description of the image (the diffusion prompt); it is ``None``
    until a captioner or a dataset provides one. ``image`` is the frame's picture, in memory (``None``
    for a story read from ``story.json`` alone).
    """

    index: int
    story_caption: str
    description: str | None
    image: Image.Image | None
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
        if self.image is not None and not isinstance(self.image, Image.Image):
            raise ValueError(f"Frame.image must be a PIL image or None, got {type(self.image).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "story_caption": self.story_caption,
            "description": self.description,
            "image": frame_file(self.index),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], image: Image.Image | None = None) -> Frame:
        """A frame from its ``story.json`` entry (which names its image file; see :func:`image_path`)."""
        missing = [key for key in _FRAME_KEYS if key not in data]
        unknown = [key for key in data if key not in _FRAME_KEYS]
        if missing or unknown:
            raise ValueError(
                f"frame keys: missing {missing}, unknown {unknown}; expected exactly {list(_FRAME_KEYS)}"
            )
        image_path(data)  # a valid relative path, even when the image itself is not loaded
        return cls(data["index"], data["story_caption"], data["description"], image, data["source"])


def image_path(frame_entry: dict[str, Any]) -> str:
    """The image path of a ``story.json`` frame entry, checked to be relative to the story folder."""
    path = frame_entry.get("image")
    if not isinstance(path, str) or not path or Path(path).is_absolute():
        raise ValueError(f"Frame.image must be a path relative to the story folder, got {path!r}")
    return path


def check_story_settings(metadata: dict[str, Any]) -> None:
    """The settings a story's metadata holds for continuing it are what ``--seed`` and ``--frames`` accept."""
    seed, frames = metadata.get("seed"), metadata.get("frames_requested")
    if seed is not None and not is_valid_seed(seed):
        raise ValueError(f"metadata.seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if frames is not None and (not _is_int(frames) or not MIN_FRAMES <= frames <= MAX_FRAMES):
        raise ValueError(
            f"metadata.frames_requested must be an integer in {MIN_FRAMES}..{MAX_FRAMES}, got {frames!r}"
        )


def is_valid_seed(seed: object) -> bool:
    return _is_int(seed) and 0 <= seed <= MAX_SEED


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Story:
    """Ordered frames (0 = the seed), free-form JSON metadata, and the resolved config it was told with.

    ``config`` is written as the folder's ``config.yaml``: ``storypipe edit`` and ``generate --resume``
    rebuild the same models from it.
    """

    frames: list[Frame]
    metadata: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        indices = [frame.index for frame in self.frames]
        if indices != list(range(len(self.frames))):
            raise ValueError(f"frame indices must be 0..{len(self.frames) - 1} in order, got {indices}")

    def copy(self) -> Story:
        """A copy whose frames, metadata and config can change without touching this story (images are
        shared: a frame gets a new image, never an image changed in place)."""
        frames = [Frame(f.index, f.story_caption, f.description, f.image, f.source) for f in self.frames]
        return Story(frames, copy.deepcopy(self.metadata), copy.deepcopy(self.config))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STORY_JSON_VERSION,
            "metadata": self.metadata,
            "frames": [frame.to_dict() for frame in self.frames],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Story:
        """The story a ``story.json`` document describes, without images; raises ``ValueError`` if invalid."""
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
        if not isinstance(frames, list) or not all(isinstance(frame, dict) for frame in frames):
            raise ValueError("'frames' must be a list of objects")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ValueError("'metadata' must be an object")
        check_story_settings(metadata)
        return cls(frames=[Frame.from_dict(frame) for frame in frames], metadata=metadata)

    def save(self, folder: str | Path) -> Path:
        """Write the story folder (``story.json``, frames, ``config.yaml``, storyboards; ``history/`` keeps
        what this replaces of a story already there). Returns the folder."""
        from pipeline.story_folder import save_story

        return save_story(Path(folder), self)

    @classmethod
    def load(cls, folder: str | Path) -> Story:
        """Read a story folder, images included."""
        from pipeline.story_folder import load_story

        return load_story(Path(folder))
