"""FlintstonesSV and PororoSV, converted once into the VIST layout (see :mod:`pipeline.data.vist`).

These are the story-visualisation datasets of StoryGAN, StoryDALL-E, AR-LDM and Make-A-Story. We read
their *published* layouts, the way those projects' loaders read them, and write::

    OUT/sis/{split}.story-in-sequence.json          # SIS original_text: the caption (or its referential version)
    OUT/dii/{split}.description-in-isolation.json   # DII original_text: the caption, always literal
    OUT/images/{split}/{photo_id}.png               # one RGB frame per clip

Every entry of the top-level ``images`` list of both files carries ground-truth labels,
``{"characters": [sorted names], "background": setting or null}``, which the VIST loader attaches to
each frame (``VistFrame.labels``).

Stories, splits and frames follow the published protocol:

* a story is a frame id plus its 4 "following" ids from ``following_cache4``, in that order;
* FlintstonesSV splits come from ``train-val-test_split.json`` (ids whose followings are not exactly 4
  long are skipped, as the published loaders do); PororoSV splits come from
  ``train_seen_unseen_ids.npy`` = (train, seen, unseen) story indices: train -> train, the "seen" test
  set -> val and the "unseen" test set -> test, as StoryDALL-E and AR-LDM use them;
* a clip stores several video frames; we always take the middle one (index ``n // 2`` of ``n``), so the
  same input gives the same bytes.

A clip can be in several (overlapping) stories of a split; its image, DII description and labels are
written once per split. The story id is the published story key (FlintstonesSV: the first clip's
``globalID``; PororoSV: the story's index in ``img_cache4.npy``); the album id is the episode.

The published files include pickles. They are loaded with a restricted unpickler that only rebuilds
numpy arrays and plain Python data, never arbitrary objects.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image

from pipeline.data.referential import (
    FLINTSTONES_ALIASES,
    FLINTSTONES_PRONOUNS,
    PORORO_ALIASES,
    PORORO_PRONOUNS,
    referential_captions,
)
from pipeline.data.vist import (
    SPLITS,
    VistSplitWriter,
    dii_annotation,
    sis_annotation,
)
from pipeline.errors import DataError, InputError
from pipeline.io import atomic_save_image, atomic_write_folder, read_json

Dataset = Literal["flintstones", "pororo"]
DATASETS: tuple[str, ...] = ("flintstones", "pororo")
STORY_LENGTH = 5  # a frame and its 4 followings
FOLLOWING_FRAMES = STORY_LENGTH - 1
IMAGE_SUFFIX = ".png"
MISSING_EXAMPLES = 3  # missing frames named in an error message
# What convert_storysv writes into its folder (and the CLI adds config.yaml): a folder holding anything
# else is not an earlier conversion, and is not replaced.
CONVERTED_NAMES = frozenset({"sis", "dii", "images", "config.yaml"})

# --------------------------------------------------------------------------------------------
# FlintstonesSV: layout as AR-LDM's data_script/flintstones_hdf5.py and StoryDALL-E's
# mega-story-dalle/flintstones_dataloader.py read it
# --------------------------------------------------------------------------------------------

FLINTSTONES_ANNOTATIONS = "flintstones_annotations_v1-0.json"  # [{"globalID", "description", "setting", ...}]
FLINTSTONES_SPLIT_FILE = "train-val-test_split.json"  # {"train": [globalID], "val": [...], "test": [...]}
FLINTSTONES_FOLLOWINGS = "following_cache4.pkl"  # pickled {globalID: [4 following globalIDs]}
FLINTSTONES_LABELS = "labels.pkl"  # pickled {globalID: 7 zeros/ones in FLINTSTONES_LABEL_ORDER}
FLINTSTONES_FRAMES = "video_frames_sampled"  # {globalID}.npy: uint8 (n_frames, 128, 128, 3)
# Label index -> name: the order of VLCStoryGan's / StoryDALL-E's unique_characters
# ["Wilma", "Fred", "Betty", "Barney", "Dino", "Pebbles", "Mr Slate"], with our lower-case names.
FLINTSTONES_LABEL_ORDER = ("wilma", "fred", "betty", "barney", "dino", "pebbles", "slate")
FLINTSTONES_EPISODE = re.compile(r"^(s_\d+_e_\d+)_")  # globalID "s_01_e_01_shot_000000_000073"
FLINTSTONES_CONTENTS = (
    f"{FLINTSTONES_ANNOTATIONS}, {FLINTSTONES_SPLIT_FILE}, {FLINTSTONES_FOLLOWINGS}, {FLINTSTONES_LABELS} "
    f"and {FLINTSTONES_FRAMES}/{{globalID}}.npy"
)

# --------------------------------------------------------------------------------------------
# PororoSV: layout as AR-LDM's data_script/pororo_hdf5.py and StoryDALL-E's
# story-dalle/pororo_dataloader.py read it
# --------------------------------------------------------------------------------------------

PORORO_DESCRIPTIONS = "descriptions.npy"  # 0-d object array: {"Episode/frame": [caption, ...]}
PORORO_IMAGE_CACHE = "img_cache4.npy"  # (n_stories,) bytes: b"Episode/frame.png", each story's first frame
PORORO_FOLLOWINGS = "following_cache4.npy"  # (n_stories, 4) bytes: the 4 following frames
PORORO_LABELS = "labels.npy"  # 0-d object array: {"Episode/frame": 9 zeros/ones in PORORO_LABEL_ORDER}
PORORO_SPLIT_IDS = "train_seen_unseen_ids.npy"  # object array (train, seen, unseen) of story indices
# Label index -> name, as StoryDALL-E's split-statistics script lists PororoSV's characters.
PORORO_LABEL_ORDER = ("pororo", "loopy", "crong", "eddy", "poby", "petty", "tongtong", "rody", "harry")
PORORO_SPLIT_ORDER = ("train", "val", "test")  # train, "seen" test set, "unseen" test set
FRAME_NAME_KINDS = "SUO"  # img_cache4 / following_cache4: bytes, text, or objects holding either
PORORO_PHOTO_SEPARATOR = "__"  # "Episode/frame" -> photo id "Episode__frame"
PORORO_CONTENTS = (
    f"{PORORO_DESCRIPTIONS}, {PORORO_IMAGE_CACHE}, {PORORO_FOLLOWINGS}, {PORORO_LABELS}, {PORORO_SPLIT_IDS} "
    "and one folder of {frame}.png strips per episode"
)

UNSAFE_ID_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]")  # photo ids become file names


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFrame:
    """One clip of the source dataset: its caption, labels and where its frames are."""

    key: str  # published id: FlintstonesSV globalID, PororoSV "Episode/frame"
    photo_id: str  # file-name-safe id in our layout
    album_id: str  # the episode
    caption: str  # white space collapsed
    characters: tuple[str, ...]  # sorted names from the label array
    background: str | None  # FlintstonesSV setting; PororoSV has none
    image_file: Path  # FlintstonesSV .npy clip, PororoSV .png strip

    @property
    def labels(self) -> dict[str, Any]:
        return {"characters": list(self.characters), "background": self.background}


@dataclass(frozen=True)
class SourceStory:
    story_id: str
    frame_keys: tuple[str, ...]  # the frame, then its followings


@dataclass(frozen=True)
class StorySvSource:
    """A whole dataset as read from its published layout; images are read one at a time."""

    dataset: str
    stories: Mapping[str, tuple[SourceStory, ...]]  # split -> stories, in the source order
    frames: Mapping[str, SourceFrame]  # key -> frame, for every frame some story uses
    read_image: Callable[[Path], Image.Image]
    pronouns: Mapping[str, str]
    aliases: Mapping[str, tuple[str, ...]]


# --------------------------------------------------------------------------------------------
# Converting
# --------------------------------------------------------------------------------------------


def convert_storysv(
    dataset: Dataset,
    src: Path,
    out: Path,
    referential: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Convert FlintstonesSV or PororoSV at ``src`` into the VIST layout under ``out``.

    Returns the number of stories per split. With ``referential``, SIS captions get Make-A-Story's
    referential text (:func:`pipeline.data.referential.referential_captions`, driven by the frame labels);
    DII descriptions stay literal. ``progress(n)`` is called with the number of stories just written.

    Every input file is checked before anything is written. The dataset is then written into a staging
    folder next to ``out`` and swapped in when complete, so a failure halfway leaves ``out`` as it was.
    ``out`` must be new, empty, or an earlier conversion (which is replaced).
    """
    source = read_storysv(dataset, Path(src))
    out = Path(out)
    _require_output_folder(out)
    counts: dict[str, int] = {}

    def write(staging: Path) -> None:
        for split in SPLITS:
            counts[split] = _write_split(source, split, staging, referential, progress)

    atomic_write_folder(out, write)
    return counts


def _write_split(
    source: StorySvSource,
    split: str,
    out: Path,
    referential: bool,
    progress: Callable[[int], None] | None,
) -> int:
    """Write one split's images and SIS/DII files under ``out``; returns its number of stories."""
    docs = VistSplitWriter(out, split)
    written: set[str] = set()
    album_ids: set[str] = set()
    for story in source.stories[split]:
        frames = [source.frames[key] for key in story.frame_keys]
        captions = [frame.caption for frame in frames]
        if referential:
            characters = [frame.characters for frame in frames]
            captions = referential_captions(captions, characters, source.pronouns, source.aliases)
        album_id = frames[0].album_id
        for order, (frame, text) in enumerate(zip(frames, captions, strict=True)):
            docs.sis.append(sis_annotation(story.story_id, album_id, frame.photo_id, order, text))
            if frame.photo_id in written:
                continue
            written.add(frame.photo_id)
            docs.dii.append(dii_annotation(frame.album_id, frame.photo_id, order, frame.caption))
            docs.images.append({"id": frame.photo_id, "album_id": frame.album_id, "labels": frame.labels})
            atomic_save_image(
                docs.folder / f"{frame.photo_id}{IMAGE_SUFFIX}", source.read_image(frame.image_file)
            )
            if frame.album_id not in album_ids:
                album_ids.add(frame.album_id)
                docs.albums.append({"id": frame.album_id, "title": f"{source.dataset} {frame.album_id}"})
        if progress is not None:
            progress(1)
    docs.write()
    return len(source.stories[split])


def _require_output_folder(out: Path) -> None:
    """``out`` may be new, empty, or an earlier conversion: never a folder of other files, which the
    conversion would replace."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; give a new or empty folder for the converted dataset")
    others = sorted(set(os.listdir(out)) - CONVERTED_NAMES) if out.is_dir() else []
    if others:
        raise InputError(
            f"{out} holds other files than a converted dataset ({', '.join(others[:MISSING_EXAMPLES])}); "
            "give a new or empty folder, or an earlier conversion to replace"
        )


def read_storysv(dataset: Dataset, src: Path) -> StorySvSource:
    """Read the published layout of ``dataset`` (``"flintstones"`` or ``"pororo"``) at ``src``."""
    if dataset == "flintstones":
        return read_flintstones(src)
    if dataset == "pororo":
        return read_pororo(src)
    raise ValueError(f"unknown story-visualisation dataset {dataset!r}; expected one of {DATASETS}")


def _require_source_folder(src: Path, name: str, contents: str) -> None:
    if not src.is_dir():
        raise DataError(f"{src} is not a folder: a {name} folder holds {contents}")


# --------------------------------------------------------------------------------------------
# FlintstonesSV
# --------------------------------------------------------------------------------------------


def read_flintstones(src: Path) -> StorySvSource:
    """Read FlintstonesSV's published layout (see the FLINTSTONES_* constants)."""
    src = Path(src)
    _require_source_folder(src, "FlintstonesSV", FLINTSTONES_CONTENTS)
    names = (FLINTSTONES_ANNOTATIONS, FLINTSTONES_SPLIT_FILE, FLINTSTONES_FOLLOWINGS, FLINTSTONES_LABELS)
    annotations_file, split_file, followings_file, labels_file = (
        _require_file(src / name, "FlintstonesSV", FLINTSTONES_CONTENTS) for name in names
    )
    _require_folder(src / FLINTSTONES_FRAMES, "FlintstonesSV", FLINTSTONES_CONTENTS)

    annotations = read_json(annotations_file, "re-download it")
    if not isinstance(annotations, list):
        raise DataError(
            f"{annotations_file}: expected a list of clip annotations, got {type(annotations).__name__}"
        )
    descriptions: dict[str, str] = {}
    settings: dict[str, str | None] = {}
    for index, sample in enumerate(annotations):
        if not isinstance(sample, dict) or "globalID" not in sample or "description" not in sample:
            raise DataError(f"{annotations_file}: entry {index} lacks 'globalID' or 'description'")
        key, description, setting = sample["globalID"], sample["description"], sample.get("setting")
        if not all(isinstance(text, str) for text in (key, description, setting or "")):
            raise DataError(
                f"{annotations_file}: entry {index} should have text 'globalID', 'description' and 'setting'"
            )
        descriptions[key] = description
        settings[key] = (setting or "").strip() or None  # an empty or absent setting is no label

    splits = read_json(split_file, "re-download it")
    if not isinstance(splits, dict) or any(
        not isinstance(splits.get(s), list) or not all(isinstance(key, str) for key in splits[s])
        for s in SPLITS
    ):
        raise DataError(f"{split_file}: expected an object with 'train', 'val' and 'test' lists of globalIDs")
    followings = _load_pickle(followings_file)
    if not isinstance(followings, dict):
        raise DataError(f"{followings_file}: expected a pickled dict globalID -> following globalIDs")
    labels = _load_pickle(labels_file)
    if not isinstance(labels, dict):
        raise DataError(f"{labels_file}: expected a pickled dict globalID -> character labels")

    stories: dict[str, tuple[SourceStory, ...]] = {}
    for split in SPLITS:
        split_stories = []
        for first in splits[split]:
            following = followings.get(first)
            if following is None:
                continue
            if not isinstance(following, (list, tuple)) or not all(isinstance(k, str) for k in following):
                raise DataError(
                    f"{followings_file}: the followings of {first!r} should be a list of globalIDs, "
                    f"got {_describe(following)}"
                )
            if len(following) != FOLLOWING_FRAMES:
                continue  # the end of an episode: the published loaders skip it too
            split_stories.append(SourceStory(first, (first, *following)))
        stories[split] = tuple(split_stories)

    frames: dict[str, SourceFrame] = {}
    for key in _used_keys(stories):
        if key not in descriptions:
            raise DataError(f"{annotations_file} has no annotation for clip {key!r}, which a story uses")
        frames[key] = SourceFrame(
            key=key,
            photo_id=_safe_id(key),
            album_id=_flintstones_episode(key),
            caption=_clean(descriptions[key]),
            characters=_characters(labels, key, FLINTSTONES_LABEL_ORDER, labels_file),
            background=settings[key],
            image_file=src / FLINTSTONES_FRAMES / f"{key}.npy",
        )
    _require_frames(frames, src / FLINTSTONES_FRAMES, check_flintstones_clip)
    return StorySvSource(
        dataset="flintstones",
        stories=MappingProxyType(stories),
        frames=MappingProxyType(frames),
        read_image=read_flintstones_frame,
        pronouns=FLINTSTONES_PRONOUNS,
        aliases=FLINTSTONES_ALIASES,
    )


def check_flintstones_clip(path: Path) -> None:
    """Check a ``video_frames_sampled`` clip's header: RGB frames of numbers, all of their data there."""
    with open(path, "rb") as handle:
        shape, dtype = _read_npy_header(handle, path)
    frame_shape = shape[1:] if len(shape) == 4 else shape
    if len(shape) not in (3, 4) or dtype.kind not in NUMBER_KINDS or 0 in shape or frame_shape[-1:] != (3,):
        raise DataError(
            f"{path}: expected RGB frames of 8-bit numbers, shape (n, height, width, 3), got shape {shape} "
            f"of {dtype}; re-download or re-extract it"
        )


def read_flintstones_frame(path: Path) -> Image.Image:
    """The middle frame of a ``video_frames_sampled`` clip (``(n, H, W, 3)``; ``(H, W, 3)`` is one frame).

    The clip is memory-mapped, so only the chosen frame is read.
    """
    check_flintstones_clip(path)
    try:
        clip = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npy clip ({exc}); re-download or re-extract it") from exc
    frame = np.asarray(clip[clip.shape[0] // 2] if clip.ndim == 4 else clip)
    low, high = FRAME_VALUE_RANGE
    if frame.dtype != np.uint8 and not np.all((frame >= low) & (frame <= high)):
        raise DataError(f"{path}: frame values should lie in {low}..{high}; re-download or re-extract it")
    return Image.fromarray(np.ascontiguousarray(frame).astype(np.uint8), "RGB")


def _flintstones_episode(key: str) -> str:
    match = FLINTSTONES_EPISODE.match(key)
    return match.group(1) if match else key


# --------------------------------------------------------------------------------------------
# PororoSV
# --------------------------------------------------------------------------------------------


def read_pororo(src: Path) -> StorySvSource:
    """Read PororoSV's published layout (see the PORORO_* constants)."""
    src = Path(src)
    _require_source_folder(src, "PororoSV", PORORO_CONTENTS)
    names = (PORORO_DESCRIPTIONS, PORORO_IMAGE_CACHE, PORORO_FOLLOWINGS, PORORO_LABELS, PORORO_SPLIT_IDS)
    descriptions_file, image_cache_file, followings_file, labels_file, split_file = (
        _require_file(src / name, "PororoSV", PORORO_CONTENTS) for name in names
    )
    descriptions = _load_npy_item(descriptions_file, "a dict frame id -> list of captions")
    labels = _load_npy_item(labels_file, "a dict frame id -> character labels")
    first_frames = _load_npy(image_cache_file)
    followings = _load_npy(followings_file)
    if (
        first_frames.ndim != 1
        or followings.ndim != 2
        or followings.shape != (len(first_frames), FOLLOWING_FRAMES)
        or first_frames.dtype.kind not in FRAME_NAME_KINDS
        or followings.dtype.kind not in FRAME_NAME_KINDS
    ):
        raise DataError(
            f"{image_cache_file} and {followings_file}: expected frame names of shapes (n,) and "
            f"(n, {FOLLOWING_FRAMES}), got {first_frames.shape} of {first_frames.dtype} and "
            f"{followings.shape} of {followings.dtype}"
        )
    split_ids = _load_npy(split_file)
    if split_ids.ndim == 0 or len(split_ids) != len(PORORO_SPLIT_ORDER):
        raise DataError(f"{split_file}: expected 3 arrays (train, seen, unseen) of story indices")

    stories: dict[str, tuple[SourceStory, ...]] = {}
    for split, ids in zip(PORORO_SPLIT_ORDER, split_ids, strict=True):
        indices = np.sort(_story_indices(ids, len(first_frames), split_file))
        stories[split] = tuple(
            SourceStory(
                str(int(index)),
                (
                    _pororo_key(first_frames[index], image_cache_file),
                    *(_pororo_key(raw, followings_file) for raw in followings[index]),
                ),
            )
            for index in indices
        )

    frames: dict[str, SourceFrame] = {}
    for key in _used_keys(stories):
        if key not in descriptions:
            raise DataError(f"{descriptions_file} has no caption for frame {key!r}, which a story uses")
        captions = descriptions[key]
        caption = (
            captions
            if isinstance(captions, str)
            else captions[0]
            if _is_list(captions) and len(captions)
            else None
        )
        if not isinstance(caption, str):  # the first of its captions
            raise DataError(
                f"{descriptions_file}: the captions of {key!r} should be a list of texts, got {_describe(captions)}"
            )
        episode = key.rsplit("/", 1)[0]
        frames[key] = SourceFrame(
            key=key,
            photo_id=_safe_id(key.replace("/", PORORO_PHOTO_SEPARATOR)),
            album_id=episode,
            caption=_clean(caption),
            characters=_characters(labels, key, PORORO_LABEL_ORDER, labels_file),
            background=None,
            image_file=src / f"{key}{IMAGE_SUFFIX}",
        )
    _require_frames(frames, src, check_pororo_strip)
    return StorySvSource(
        dataset="pororo",
        stories=MappingProxyType(stories),
        frames=MappingProxyType(frames),
        read_image=read_pororo_frame,
        pronouns=PORORO_PRONOUNS,
        aliases=PORORO_ALIASES,
    )


def check_pororo_strip(path: Path) -> None:
    """Check that a strip's header is an image's (its pixels are decoded when it is converted)."""
    try:
        with Image.open(path):
            pass
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path} is not an image ({exc}); re-download or re-extract it") from exc


def read_pororo_frame(path: Path) -> Image.Image:
    """The middle frame of a PororoSV strip: square frames stacked vertically (width w, height n * w).

    An image wider than it is tall is taken as a single frame.
    """
    try:
        with Image.open(path) as strip:
            rgb = strip.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path} does not decode as an image ({exc}); re-download or re-extract it") from exc
    width, height = rgb.size
    if height < width:
        return rgb
    middle = (height // width) // 2
    return rgb.crop((0, middle * width, width, (middle + 1) * width))


def _story_indices(ids: Any, stories: int, path: Path) -> np.ndarray:
    """One split's story indices, as integers in ``0..stories - 1``."""
    indices = np.asarray(ids) if _is_list(ids) else None
    if indices is None or indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        raise DataError(f"{path}: each split should be a list of story indices, got {_describe(ids)}")
    if indices.size and (indices.min() < 0 or indices.max() >= stories):
        raise DataError(f"{path}: story indices must lie in 0..{stories - 1}")
    return indices.astype(np.int64)


def _pororo_key(raw: Any, path: Path) -> str:
    """``b"Pororo_ENGLISH1_1_ep1/0.png"`` (bytes, str, or str(bytes)) -> ``"Pororo_ENGLISH1_1_ep1/0"``.

    Any folder prefix is dropped: the key is the episode folder and the frame number.
    """
    if not isinstance(raw, (bytes, str)):
        raise DataError(f"{path}: frame names should be texts like b'Episode/0.png', got {_describe(raw)}")
    text = raw.decode("latin1") if isinstance(raw, bytes) else raw
    if text[:2] in ("b'", 'b"') and text[-1:] == text[1]:
        text = text[2:-1]  # str() of bytes, as the published loaders slice it
    text = text.removesuffix(IMAGE_SUFFIX)
    parts = [part for part in text.replace("\\", "/").split("/") if part not in ("", ".")]
    return "/".join(parts[-2:])


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _require_file(path: Path, name: str, contents: str) -> Path:
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: a {name} folder holds {contents}, as the StoryDALL-E / AR-LDM "
            "downloads unpack; point the converter at that folder"
        )
    return path


def _require_folder(path: Path, name: str, contents: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path} does not exist: a {name} folder holds {contents}")


def _require_frames(frames: Mapping[str, SourceFrame], folder: Path, check: Callable[[Path], None]) -> None:
    """Fail before writing anything when a frame that a story uses has no image file, or ``check`` finds
    its header wrong."""
    missing = [frame.image_file for frame in frames.values() if not frame.image_file.is_file()]
    if missing:
        examples = ", ".join(str(path) for path in missing[:MISSING_EXAMPLES])
        raise DataError(
            f"{len(missing)} frame file(s) that stories use are missing under {folder} (e.g. {examples}); "
            "the download is incomplete"
        )
    for frame in frames.values():
        check(frame.image_file)


def _used_keys(stories: Mapping[str, Sequence[SourceStory]]) -> list[str]:
    """Every frame key some story uses, once each, in first-use order."""
    return list(
        dict.fromkeys(key for split in SPLITS for story in stories[split] for key in story.frame_keys)
    )


def _characters(labels: Mapping[Any, Any], key: str, order: tuple[str, ...], path: Path) -> tuple[str, ...]:
    """Sorted names of the characters whose entry in ``labels[key]`` is non-zero."""
    if key not in labels:
        raise DataError(f"{path} has no character labels for frame {key!r}, which a story uses")
    flags = labels[key]
    if isinstance(flags, np.ndarray):
        plain = flags.size == len(order) and flags.dtype.kind in NUMBER_KINDS
    else:
        plain = _is_list(flags) and len(flags) == len(order) and all(_is_number(v) for v in flags)
    if not plain:
        raise DataError(
            f"{path}: labels of {key!r} should be {len(order)} zeros or ones ({', '.join(order)}), "
            f"got {_describe(flags)}"
        )
    values = np.asarray(flags, dtype=np.float64).reshape(-1)
    return tuple(sorted(name for name, value in zip(order, values, strict=True) if value > 0))


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number, np.bool_))


def _describe(value: Any) -> str:
    """A short description of a wrong value for an error message: its type, and its shape or length."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} of {value.dtype}"
    if isinstance(value, (list, tuple, dict, str, bytes)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"{value!r:.40} ({type(value).__name__})"


def _clean(text: str) -> str:
    """Collapse white space (the published loaders strip newlines and tabs)."""
    return " ".join(text.split())


def _safe_id(text: str) -> str:
    return UNSAFE_ID_CHARACTERS.sub("_", text)


# --------------------------------------------------------------------------------------------
# Pickles and .npy files: only plain numpy arrays and plain Python data, of bounded size
# --------------------------------------------------------------------------------------------

# No array of these datasets comes near this (the largest, PororoSV's following_cache4.npy, is a few MB;
# a FlintstonesSV clip is 5x128x128x3 bytes), and it is far below a machine's memory: a file whose
# header or pickle asks for more is refused before numpy allocates anything.
MAX_ARRAY_BYTES = 1 << 30
PLAIN_DTYPE_KINDS = "biufcSUO"  # bool, integers, floats, complex, bytes, str, object: no records
NUMBER_KINDS = "biuf"
FRAME_VALUE_RANGE = (0, 255)  # frames that are not uint8 must still hold 8-bit values


class _NdarrayName:
    """What ``numpy.ndarray`` means in a pickle: the array type that ``_reconstruct`` builds, nothing that
    can be called to make an array (``ndarray(shape, dtype, buffer, offset, strides)`` reads any memory)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _NdarrayName:
        raise pickle.UnpicklingError("refusing to call numpy.ndarray: arrays are rebuilt from their state")


class _CheckedArray(np.ndarray):
    """The arrays a pickle rebuilds: plain ndarrays whose pickled state is checked before numpy reads it.

    numpy's own ``__setstate__`` allocates the shape it is given before comparing it with the data, and
    reads past an object list shorter than that shape (a crash); see :func:`_checked_array_state`.
    """

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(_checked_array_state(state))


def _plain_dtype(spec: Any) -> np.dtype:
    """``spec`` as a dtype of numbers, bytes, text or objects; records and sub-arrays are refused, since
    numpy does not check the field offsets of a pickled dtype against its size."""
    dtype = spec if isinstance(spec, np.dtype) else np.dtype(spec)
    plain = dtype.kind in PLAIN_DTYPE_KINDS and dtype.fields is None and dtype.subdtype is None
    if not plain or dtype.itemsize != np.dtype(dtype.str).itemsize:
        raise ValueError(f"refusing dtype {dtype!r:.80}: only numbers, strings and objects")
    return dtype


def _checked_shape(shape: Any, dtype: np.dtype) -> tuple[int, ...]:
    """``shape`` as sizes, when an array of that shape and ``dtype`` fits in ``MAX_ARRAY_BYTES``."""
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"the array shape {shape!r:.80} is not a tuple of sizes")
    nbytes = math.prod(shape) * max(dtype.itemsize, 1)
    if nbytes > MAX_ARRAY_BYTES:
        raise ValueError(
            f"an array of shape {shape!r:.80} and dtype {dtype} would take {nbytes / 2**30:,.0f} GiB, "
            f"more than the {MAX_ARRAY_BYTES / 2**30:.0f} GiB any array of these datasets needs"
        )
    return shape


def _checked_array_state(state: Any) -> Any:
    """An ndarray's pickled state, ``([version,] shape, dtype, is_fortran, data)``, once its dtype is plain,
    its shape bounded and its data exactly as long as the shape says."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise ValueError("an array's pickled state is not (shape, dtype, order, data)")
    shape, dtype, _, data = state[-4:]
    dtype = _plain_dtype(dtype)
    elements = math.prod(_checked_shape(shape, dtype))
    if dtype.hasobject:
        complete = isinstance(data, list) and len(data) == elements
    else:  # bytes; str from a Python 2 pickle read as latin-1
        complete = isinstance(data, (bytes, bytearray, str)) and len(data) == elements * dtype.itemsize
    if not complete:
        raise ValueError(f"an array's data does not match its shape {shape} and dtype {dtype}")
    return state


def _reconstruct_array(array_type: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct``: the empty array that the pickle's state then fills."""
    if array_type is not _NdarrayName:
        raise pickle.UnpicklingError("only numpy arrays are rebuilt")
    dtype = _plain_dtype(dtype)
    return _CheckedArray(_checked_shape(shape, dtype), dtype)


def _numpy_scalar(dtype: Any, *data: Any) -> Any:
    """numpy's ``scalar``: a numpy number or string from its bytes (numpy checks their length)."""
    return _numpy_core("multiarray").scalar(_plain_dtype(dtype), *data)


def _array_from_buffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's ``_frombuffer`` (pickle protocol 5): an array over bytes the pickle holds."""
    dtype = _plain_dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays do not come from a buffer")
    return np.frombuffer(buffer, dtype=dtype).reshape(_checked_shape(shape, dtype), order=order)


def _latin1_bytes(text: Any, encoding: str) -> bytes:
    """``_codecs.encode(text, "latin1")``: how protocol 2 pickles store bytes; no other codec is run."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 text is encoded")
    return text.encode("latin1")


def _numpy_core(name: str) -> Any:
    """numpy's ``_core.<name>`` module (``core`` before numpy 2)."""
    core = "numpy._core" if importlib.util.find_spec("numpy._core") is not None else "numpy.core"
    return importlib.import_module(f"{core}.{name}")


# What a pickle may name, and what it gets: checked builders for numpy's, plain data otherwise.
# numpy 1.x wrote ``numpy.core.*``, numpy 2 writes ``numpy._core.*``.
_NUMPY_BUILDERS: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {
        "multiarray._reconstruct": _reconstruct_array,
        "multiarray.scalar": _numpy_scalar,
        "numeric._frombuffer": _array_from_buffer,
    }
)
_NUMPY_CORES = ("numpy.core.", "numpy._core.")
_PLAIN_GLOBALS: Mapping[tuple[str, str], Any] = MappingProxyType(
    {
        ("numpy", "ndarray"): _NdarrayName,
        ("numpy", "dtype"): np.dtype,  # every use of a dtype goes through _plain_dtype
        ("_codecs", "encode"): _latin1_bytes,
        ("collections", "OrderedDict"): OrderedDict,
    }
)


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds plain data and checked numpy arrays, and refuses every other global
    (no arbitrary code, no unchecked numpy state)."""

    def find_class(self, module: str, name: str) -> Any:
        for core in _NUMPY_CORES:
            if module.startswith(core) and f"{module[len(core) :]}.{name}" in _NUMPY_BUILDERS:
                return _NUMPY_BUILDERS[f"{module[len(core) :]}.{name}"]
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[module, name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain data")


def _unpickle(handle: BinaryIO, path: Path) -> Any:
    try:
        return _DataUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as exc:
        raise DataError(f"{path} could not be loaded as data ({exc}); re-download it") from exc
    except (MemoryError, RecursionError) as exc:
        raise DataError(
            f"{path} could not be loaded as data (it is too large or too deeply nested); re-download it"
        ) from exc


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as handle:
        return _unpickle(handle, path)


def _read_npy_header(handle: BinaryIO, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype in the header of the .npy file open in ``handle``, left at the array's data.

    The dtype must be plain and the shape bounded (``MAX_ARRAY_BYTES``); an array of numbers or strings
    must also be there in full: a header cannot claim more data than the file holds.
    """
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        dtype = _plain_dtype(dtype)
        shape = _checked_shape(shape, dtype)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path} is not a readable .npy file ({exc}); re-download it") from exc
    if not dtype.hasobject:
        needed, held = math.prod(shape) * dtype.itemsize, os.fstat(handle.fileno()).st_size - handle.tell()
        if held < needed:
            raise DataError(
                f"{path}: its header describes a {shape} array of {dtype} ({needed:,} bytes), but only "
                f"{held:,} bytes follow; the file is truncated: re-download it"
            )
    return shape, dtype


def _load_npy(path: Path) -> np.ndarray:
    """``np.load`` for a .npy file, but the header is checked first and object arrays go through the
    restricted unpickler."""
    with open(path, "rb") as handle:
        shape, dtype = _read_npy_header(handle, path)
        if not dtype.hasobject:
            handle.seek(0)
            try:
                return np.load(handle, allow_pickle=False)
            except ValueError as exc:
                raise DataError(f"{path} is not a readable .npy file ({exc}); re-download it") from exc
        array = _unpickle(handle, path)
    if not isinstance(array, np.ndarray) or array.shape != shape:
        got = f"shape {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise DataError(f"{path}: expected the numpy array of shape {shape} its header describes, got {got}")
    return array


def _load_npy_item(path: Path, what: str) -> dict:
    """A .npy file holding one pickled dict (``np.load(...).item()`` in the published loaders)."""
    array = _load_npy(path)
    item = array.item() if array.shape == () else None
    if not isinstance(item, dict):
        raise DataError(f"{path}: expected {what} saved with np.save")
    return item
