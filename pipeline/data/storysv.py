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

import importlib.util
import json
import pickle
import re
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
    dii_annotation,
    images_dir,
    sis_annotation,
    write_vist_split,
)
from pipeline.errors import DataError
from pipeline.io import atomic_save_image

Dataset = Literal["flintstones", "pororo"]
DATASETS: tuple[str, ...] = ("flintstones", "pororo")
STORY_LENGTH = 5  # a frame and its 4 followings
FOLLOWING_FRAMES = STORY_LENGTH - 1
IMAGE_SUFFIX = ".png"
MISSING_EXAMPLES = 3  # missing frames named in an error message

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
    Every file is written atomically; existing files with the same names are replaced.
    """
    source = read_storysv(dataset, Path(src))
    out = Path(out)
    counts: dict[str, int] = {}
    for split in SPLITS:
        folder = images_dir(out, split)
        folder.mkdir(parents=True, exist_ok=True)  # exists even for an empty split, as the loader expects
        sis: list[list[dict]] = []
        dii: list[list[dict]] = []
        images: list[dict] = []
        albums: list[dict] = []
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
                sis.append(sis_annotation(story.story_id, album_id, frame.photo_id, order, text))
                if frame.photo_id in written:
                    continue
                written.add(frame.photo_id)
                dii.append(dii_annotation(frame.album_id, frame.photo_id, order, frame.caption))
                images.append({"id": frame.photo_id, "album_id": frame.album_id, "labels": frame.labels})
                atomic_save_image(
                    folder / f"{frame.photo_id}{IMAGE_SUFFIX}", source.read_image(frame.image_file)
                )
                if frame.album_id not in album_ids:
                    album_ids.add(frame.album_id)
                    albums.append({"id": frame.album_id, "title": f"{dataset} {frame.album_id}"})
            if progress is not None:
                progress(1)
        write_vist_split(out, split, sis, dii, images, albums)
        counts[split] = len(source.stories[split])
    return counts


def read_storysv(dataset: Dataset, src: Path) -> StorySvSource:
    """Read the published layout of ``dataset`` (``"flintstones"`` or ``"pororo"``) at ``src``."""
    if dataset == "flintstones":
        return read_flintstones(src)
    if dataset == "pororo":
        return read_pororo(src)
    raise ValueError(f"unknown story-visualisation dataset {dataset!r}; expected one of {DATASETS}")


# --------------------------------------------------------------------------------------------
# FlintstonesSV
# --------------------------------------------------------------------------------------------


def read_flintstones(src: Path) -> StorySvSource:
    """Read FlintstonesSV's published layout (see the FLINTSTONES_* constants)."""
    src = Path(src)
    names = (FLINTSTONES_ANNOTATIONS, FLINTSTONES_SPLIT_FILE, FLINTSTONES_FOLLOWINGS, FLINTSTONES_LABELS)
    annotations_file, split_file, followings_file, labels_file = (
        _require_file(src / name, "FlintstonesSV", FLINTSTONES_CONTENTS) for name in names
    )
    _require_folder(src / FLINTSTONES_FRAMES, "FlintstonesSV", FLINTSTONES_CONTENTS)

    annotations = _read_json(annotations_file)
    if not isinstance(annotations, list):
        raise DataError(
            f"{annotations_file}: expected a list of clip annotations, got {type(annotations).__name__}"
        )
    descriptions: dict[str, str] = {}
    settings: dict[str, str | None] = {}
    for index, sample in enumerate(annotations):
        if not isinstance(sample, dict) or "globalID" not in sample or "description" not in sample:
            raise DataError(f"{annotations_file}: entry {index} lacks 'globalID' or 'description'")
        key = str(sample["globalID"])
        descriptions[key] = str(sample["description"])
        setting = str(sample.get("setting") or "").strip()
        settings[key] = setting or None  # an empty or absent setting is no label

    splits = _read_json(split_file)
    if not isinstance(splits, dict) or any(not isinstance(splits.get(s), list) for s in SPLITS):
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
        for first in map(str, splits[split]):
            following = followings.get(first)
            if following is None or len(following) != FOLLOWING_FRAMES:
                continue  # the end of an episode: the published loaders skip it too
            split_stories.append(SourceStory(first, (first, *map(str, following))))
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
    _require_frames(frames, src / FLINTSTONES_FRAMES)
    return StorySvSource(
        dataset="flintstones",
        stories=MappingProxyType(stories),
        frames=MappingProxyType(frames),
        read_image=read_flintstones_frame,
        pronouns=FLINTSTONES_PRONOUNS,
        aliases=FLINTSTONES_ALIASES,
    )


def read_flintstones_frame(path: Path) -> Image.Image:
    """The middle frame of a ``video_frames_sampled`` clip (``(n, H, W, 3)``; ``(H, W, 3)`` is one frame).

    The clip is memory-mapped, so only the chosen frame is read.
    """
    try:
        clip = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npy clip ({exc}); re-download or re-extract it") from exc
    if clip.ndim == 4:
        frame = np.asarray(clip[clip.shape[0] // 2])
    elif clip.ndim == 3:
        frame = np.asarray(clip)
    else:
        raise DataError(f"{path}: expected frames of shape (n, height, width, 3), got {clip.shape}")
    if frame.shape[-1] != 3 or frame.shape[0] == 0:
        raise DataError(f"{path}: expected RGB frames of shape (n, height, width, 3), got {clip.shape}")
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
    ):
        raise DataError(
            f"{image_cache_file} and {followings_file}: expected shapes (n,) and (n, {FOLLOWING_FRAMES}), "
            f"got {first_frames.shape} and {followings.shape}"
        )
    split_ids = _load_npy(split_file)
    if len(split_ids) != len(PORORO_SPLIT_ORDER):
        raise DataError(f"{split_file}: expected 3 arrays (train, seen, unseen) of story indices")

    stories: dict[str, tuple[SourceStory, ...]] = {}
    for split, ids in zip(PORORO_SPLIT_ORDER, split_ids, strict=True):
        indices = np.sort(np.asarray(ids, dtype=np.int64))
        if indices.size and (indices.min() < 0 or indices.max() >= len(first_frames)):
            raise DataError(f"{split_file}: story indices must lie in 0..{len(first_frames) - 1}")
        stories[split] = tuple(
            SourceStory(
                str(int(index)),
                (_pororo_key(first_frames[index]), *(_pororo_key(item) for item in followings[index])),
            )
            for index in indices
        )

    frames: dict[str, SourceFrame] = {}
    for key in _used_keys(stories):
        if key not in descriptions:
            raise DataError(f"{descriptions_file} has no caption for frame {key!r}, which a story uses")
        captions = descriptions[key]
        caption = captions if isinstance(captions, str) else captions[0]  # the first of its captions
        episode = key.rsplit("/", 1)[0]
        frames[key] = SourceFrame(
            key=key,
            photo_id=_safe_id(key.replace("/", PORORO_PHOTO_SEPARATOR)),
            album_id=episode,
            caption=_clean(str(caption)),
            characters=_characters(labels, key, PORORO_LABEL_ORDER, labels_file),
            background=None,
            image_file=src / f"{key}{IMAGE_SUFFIX}",
        )
    _require_frames(frames, src)
    return StorySvSource(
        dataset="pororo",
        stories=MappingProxyType(stories),
        frames=MappingProxyType(frames),
        read_image=read_pororo_frame,
        pronouns=PORORO_PRONOUNS,
        aliases=PORORO_ALIASES,
    )


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


def _pororo_key(raw: Any) -> str:
    """``b"Pororo_ENGLISH1_1_ep1/0.png"`` (bytes, str, or str(bytes)) -> ``"Pororo_ENGLISH1_1_ep1/0"``.

    Any folder prefix is dropped: the key is the episode folder and the frame number.
    """
    text = raw.decode("latin1") if isinstance(raw, bytes) else str(raw)
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


def _require_frames(frames: Mapping[str, SourceFrame], folder: Path) -> None:
    """Fail before writing anything when a frame that a story uses has no image file."""
    missing = [frame.image_file for frame in frames.values() if not frame.image_file.is_file()]
    if missing:
        examples = ", ".join(str(path) for path in missing[:MISSING_EXAMPLES])
        raise DataError(
            f"{len(missing)} frame file(s) that stories use are missing under {folder} (e.g. {examples}); "
            "the download is incomplete"
        )


def _used_keys(stories: Mapping[str, Sequence[SourceStory]]) -> list[str]:
    """Every frame key some story uses, once each, in first-use order."""
    return list(
        dict.fromkeys(key for split in SPLITS for story in stories[split] for key in story.frame_keys)
    )


def _characters(labels: Mapping[Any, Any], key: str, order: tuple[str, ...], path: Path) -> tuple[str, ...]:
    """Sorted names of the characters whose entry in ``labels[key]`` is non-zero."""
    if key not in labels:
        raise DataError(f"{path} has no character labels for frame {key!r}, which a story uses")
    values = np.asarray(labels[key], dtype=np.float64).reshape(-1)
    if values.shape != (len(order),):
        raise DataError(
            f"{path}: labels of {key!r} should have {len(order)} entries ({order}), got {values.shape}"
        )
    return tuple(sorted(name for name, value in zip(order, values, strict=True) if value > 0))


def _clean(text: str) -> str:
    """Collapse white space (the published loaders strip newlines and tabs)."""
    return " ".join(text.split())


def _safe_id(text: str) -> str:
    return UNSAFE_ID_CHARACTERS.sub("_", text)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-download it") from exc


# Pickles: only numpy arrays/scalars and plain Python data are rebuilt.
_NUMPY_CORE = "numpy.core"
_NUMPY_PRIVATE_CORE = "numpy._core"
_ALLOWED_GLOBALS = frozenset(
    {(f"{core}.multiarray", "_reconstruct") for core in (_NUMPY_CORE, _NUMPY_PRIVATE_CORE)}
    | {(f"{core}.multiarray", "scalar") for core in (_NUMPY_CORE, _NUMPY_PRIVATE_CORE)}
    | {(f"{core}.numeric", "_frombuffer") for core in (_NUMPY_CORE, _NUMPY_PRIVATE_CORE)}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")}
)


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside ``_ALLOWED_GLOBALS`` (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays and plain data"
            )
        if module.startswith(_NUMPY_CORE + ".") and importlib.util.find_spec(_NUMPY_PRIVATE_CORE) is not None:
            module = _NUMPY_PRIVATE_CORE + module[len(_NUMPY_CORE) :]  # numpy 1.x pickles under numpy 2
        return super().find_class(module, name)


def _unpickle(handle: BinaryIO, path: Path) -> Any:
    try:
        return _DataUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as exc:
        raise DataError(f"{path} could not be loaded as data ({exc}); re-download it") from exc


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as handle:
        return _unpickle(handle, path)


def _load_npy(path: Path) -> np.ndarray:
    """``np.load`` for a .npy file, but object arrays go through the restricted unpickler."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                _, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            if not dtype.hasobject:
                handle.seek(0)
                return np.load(handle, allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"{path} is not a readable .npy file ({exc}); re-download it") from exc
        array = _unpickle(handle, path)
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: expected a numpy array, got {type(array).__name__}")
    return array


def _load_npy_item(path: Path, what: str) -> dict:
    """A .npy file holding one pickled dict (``np.load(...).item()`` in the published loaders)."""
    array = _load_npy(path)
    item = array.item() if array.shape == () else None
    if not isinstance(item, dict):
        raise DataError(f"{path}: expected {what} saved with np.save")
    return item
