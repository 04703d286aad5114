"""VIST on disk: reading (and, for ShapeStories and test fixtures, writing) the official layout.

Layout, as the official download unpacks::

    DIR/sis/{split}.story-in-sequence.json          # story captions (SIS)
    DIR/dii/{split}.description-in-isolation.json   # literal descriptions (DII)
    DIR/images/{split}/{photo_flickr_id}.<ext>      # jpg, png, gif, ... mixed

Rules (see ``../shared/reference.md``):

* SIS annotations are grouped by ``story_id`` and ordered by ``worker_arranged_photo_order``; the
  files are not in story order. The caption is ``original_text``.
* DII annotations join to photos by ``photo_flickr_id``; with several per photo, the longest
  ``original_text`` wins.
* A story is usable when it has exactly ``story_length`` sentences, every photo has a DII caption, and
  every image exists and decodes. Other stories are dropped, recorded by reason, never silently.

Grouping only reads JSON and lists the image folder once; images are decoded lazily, one story at a
time, in :meth:`VistSplit.iter_usable` (a 40k-story split never decodes everything up front).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.errors import DataError
from pipeline.io import ImageDecodeError, atomic_write_json, load_rgb, read_json

SPLITS = ("train", "val", "test")

# Drop reasons, in the order they are checked; each dropped story is recorded under its first failure.
WRONG_LENGTH = "wrong_length"
BAD_PHOTO_ORDER = "bad_photo_order"
EMPTY_CAPTION = "empty_caption"
MISSING_DESCRIPTION = "missing_description"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
DROP_REASONS = {
    WRONG_LENGTH: "does not have exactly {story_length} sentences",
    BAD_PHOTO_ORDER: "worker_arranged_photo_order is not 0..{last_order} once each",
    EMPTY_CAPTION: "a story caption is empty",
    MISSING_DESCRIPTION: "a photo has no DII description",
    MISSING_IMAGE: "an image file is missing",
    CORRUPT_IMAGE: "an image does not decode",
}


def sis_path(root: str | Path, split: str) -> Path:
    return Path(root) / "sis" / f"{split}.story-in-sequence.json"


def dii_path(root: str | Path, split: str) -> Path:
    return Path(root) / "dii" / f"{split}.description-in-isolation.json"


def images_dir(root: str | Path, split: str) -> Path:
    return Path(root) / "images" / split


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VistFrame:
    photo_id: str
    story_caption: str  # SIS original_text
    description: str  # DII original_text (the longest, when a photo has several)
    image_file: str  # path of the image file; a str, since 200k pathlib.Paths dominate load time
    labels: dict[str, Any] | None = None  # ground truth when the dataset has it (ShapeStories)

    @property
    def image_path(self) -> Path:
        return Path(self.image_file)


@dataclass(frozen=True)
class VistStory:
    story_id: str
    album_id: str
    frames: tuple[VistFrame, ...]

    def load_images(self) -> list[Image.Image]:
        """Decode every frame's image as RGB; raises ``ImageDecodeError`` naming the bad file."""
        return [load_rgb(frame.image_file) for frame in self.frames]


@dataclass
class VistSplit:
    """The stories of one split that passed the structural checks, in ``story_id`` order.

    ``dropped`` maps a reason from ``DROP_REASONS`` to the ids of the stories dropped for it.
    Image decoding is checked lazily by :meth:`iter_usable`, which adds ``corrupt_image`` drops.
    """

    root: Path
    split: str
    story_length: int
    stories: list[VistStory]
    dropped: dict[str, list[str]] = field(default_factory=dict)
    total_stories: int = 0

    def iter_usable(self, limit: int | None = None) -> Iterator[tuple[VistStory, list[Image.Image]]]:
        """Yield ``(story, rgb_images)`` for the first ``limit`` usable stories in ``story_id`` order.

        Each story's images are decoded here, one story at a time; a story with an image that does not
        decode is recorded under ``corrupt_image`` and skipped.
        """
        yielded = 0
        for story in self.stories:
            if limit is not None and yielded >= limit:
                return
            try:
                images = story.load_images()
            except ImageDecodeError:
                self.dropped.setdefault(CORRUPT_IMAGE, []).append(story.story_id)
                continue
            yielded += 1
            yield story, images

    def drop_counts(self) -> dict[str, int]:
        return {reason: len(self.dropped.get(reason, [])) for reason in DROP_REASONS}

    def drop_report(self) -> list[str]:
        """Human-readable lines, one per reason with drops, e.g. ``'3 stories: an image file is missing (e.g. 41, 97)'``."""
        lines = []
        for reason, template in DROP_REASONS.items():
            ids = self.dropped.get(reason, [])
            if ids:
                text = template.format(story_length=self.story_length, last_order=self.story_length - 1)
                examples = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
                lines.append(
                    f"{len(ids)} {'story' if len(ids) == 1 else 'stories'} {reason}: {text} (e.g. {examples})"
                )
        return lines


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_vist_split(root: str | Path, split: str, story_length: int = 5) -> VistSplit:
    """Group and check one split; images are listed but not decoded (see :meth:`VistSplit.iter_usable`)."""
    root = Path(root)
    sis_file, dii_file, image_folder = sis_path(root, split), dii_path(root, split), images_dir(root, split)
    for path, what in ((sis_file, "story captions (SIS)"), (dii_file, "descriptions (DII)")):
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: expected the VIST {what} for split {split!r}. "
                f"A VIST folder holds sis/{{split}}.story-in-sequence.json, dii/{{split}}.description-in-isolation.json "
                f"and images/{{split}}/; `storypipe toy-data --out DIR` writes a small one."
            )
    if not image_folder.is_dir():
        raise DataError(
            f"{image_folder} does not exist: expected the images of split {split!r} there, named {{photo_flickr_id}}.<ext>"
        )

    sis = _read_vist_json(sis_file)
    dii = _read_vist_json(dii_file)
    image_files = _index_images(image_folder)
    if not isinstance(sis.get("images", []), list):
        raise DataError(f"{sis_file}: 'images' must be a list of image entries")
    labels = {
        str(entry["id"]): entry["labels"]
        for entry in sis.get("images", [])
        if isinstance(entry, dict) and "labels" in entry and "id" in entry
    }

    # Story captions, grouped by story.
    grouped: dict[str, list[dict]] = {}
    for index, annotation in enumerate(_annotations(sis, sis_file)):
        _require_keys(
            annotation,
            ("story_id", "photo_flickr_id", "worker_arranged_photo_order", "original_text"),
            sis_file,
            index,
        )
        grouped.setdefault(str(annotation["story_id"]), []).append(annotation)

    # Descriptions: the longest original_text per photo (ties: the first in file order).
    descriptions: dict[str, str] = {}
    for index, annotation in enumerate(_annotations(dii, dii_file)):
        _require_keys(annotation, ("photo_flickr_id", "original_text"), dii_file, index)
        photo_id, text = str(annotation["photo_flickr_id"]), str(annotation["original_text"]).strip()
        if text and len(text) > len(descriptions.get(photo_id, "")):
            descriptions[photo_id] = text

    stories: list[VistStory] = []
    dropped: dict[str, list[str]] = {}
    for story_id in sorted(grouped, key=story_sort_key):
        if any(_photo_order(a) is None for a in grouped[story_id]):
            dropped.setdefault(BAD_PHOTO_ORDER, []).append(story_id)
            continue
        annotations = sorted(grouped[story_id], key=_photo_order)
        reason = _structural_drop_reason(annotations, story_length, descriptions, image_files)
        if reason is not None:
            dropped.setdefault(reason, []).append(story_id)
            continue
        frames = tuple(
            VistFrame(
                photo_id=(photo_id := str(a["photo_flickr_id"])),
                story_caption=str(a["original_text"]).strip(),
                description=descriptions[photo_id],
                image_file=image_files[photo_id],
                labels=labels.get(photo_id),
            )
            for a in annotations
        )
        stories.append(
            VistStory(story_id=story_id, album_id=str(annotations[0].get("album_id", "")), frames=frames)
        )
    return VistSplit(
        root=root,
        split=split,
        story_length=story_length,
        stories=stories,
        dropped=dropped,
        total_stories=len(grouped),
    )


def _structural_drop_reason(
    annotations: list[dict], story_length: int, descriptions: dict[str, str], image_files: dict[str, str]
) -> str | None:
    if len(annotations) != story_length:
        return WRONG_LENGTH
    if [_photo_order(a) for a in annotations] != list(range(story_length)):
        return BAD_PHOTO_ORDER
    if any(not str(a["original_text"]).strip() for a in annotations):
        return EMPTY_CAPTION
    photo_ids = [str(a["photo_flickr_id"]) for a in annotations]
    if any(photo_id not in descriptions for photo_id in photo_ids):
        return MISSING_DESCRIPTION
    if any(photo_id not in image_files for photo_id in photo_ids):
        return MISSING_IMAGE
    return None


def _photo_order(annotation: dict) -> int | None:
    """``worker_arranged_photo_order`` as an integer (VIST writes integers; "3" is read as 3), else None."""
    order = annotation["worker_arranged_photo_order"]
    if isinstance(order, str) and order.strip().isdigit():
        return int(order)
    return order if isinstance(order, int) and not isinstance(order, bool) else None


def story_sort_key(story_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order (VIST's are integers as strings), then any others alphabetically."""
    return (0, int(story_id), "") if story_id.isdigit() else (1, 0, story_id)


def _index_images(folder: Path) -> dict[str, str]:
    """Map photo id (file stem) -> path with one directory listing; hidden and temp files are ignored."""
    index: dict[str, str] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and not entry.name.startswith("."):
            index.setdefault(os.path.splitext(entry.name)[0], entry.path)
    return index


def _read_vist_json(path: Path) -> dict:
    data = read_json(path, "re-download or re-generate it")
    if not isinstance(data, dict) or "annotations" not in data:
        raise DataError(
            f"{path} is not a VIST annotation file: expected an object with an 'annotations' list"
        )
    return data


def _annotations(data: dict, path: Path) -> Iterator[dict]:
    """VIST wraps each annotation in a one-element list; plain objects are accepted too."""
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise DataError(f"{path}: 'annotations' must be a list")
    for index, item in enumerate(annotations):
        annotation = item[0] if isinstance(item, list) and len(item) == 1 else item
        if not isinstance(annotation, dict):
            raise DataError(
                f"{path}: annotations[{index}] must be an object or a one-element list of one, got {item!r:.80}"
            )
        yield annotation


def _require_keys(annotation: dict, keys: tuple[str, ...], path: Path, index: int) -> None:
    missing = [key for key in keys if key not in annotation]
    if missing:
        raise DataError(
            f"{path}: annotations[{index}] lacks {missing}; is this a VIST {path.parent.name.upper()} file?"
        )


# --------------------------------------------------------------------------------------------
# Writing (ShapeStories and test fixtures produce the same layout)
# --------------------------------------------------------------------------------------------


def sis_annotation(
    story_id: str, album_id: str, photo_id: str, order: int, text: str, storylet_id: str = ""
) -> list[dict]:
    """One SIS annotation in VIST's shape: a one-element list."""
    return [
        {
            "original_text": text,
            "album_id": album_id,
            "photo_flickr_id": photo_id,
            "setting": "first-2-pick-and-tell",
            "worker_id": "storypipe",
            "story_id": story_id,
            "tier": "story-in-sequence",
            "worker_arranged_photo_order": order,
            "text": _vist_tokenised(text),
            "storylet_id": storylet_id or f"{story_id}{order}",
        }
    ]


def dii_annotation(album_id: str, photo_id: str, order: int, text: str) -> list[dict]:
    """One DII annotation in VIST's shape: a one-element list (no story_id: DII joins by photo)."""
    return [
        {
            "original_text": text,
            "album_id": album_id,
            "photo_flickr_id": photo_id,
            "photo_order_in_story": order,
            "worker_id": "storypipe",
            "text": _vist_tokenised(text),
            "tier": "descriptions-in-isolation",
        }
    ]


def vist_document(annotations: list[list[dict]], images: list[dict], albums: list[dict], tier: str) -> dict:
    """A whole SIS or DII file with VIST's top-level keys."""
    return {
        "info": {"description": "storypipe VIST-format data", "version": "1"},
        "albums": albums,
        "type": tier,
        "images": images,
        "annotations": annotations,
    }


SIS_TIER = "story-in-sequence"
DII_TIER = "descriptions-in-isolation"


@dataclass
class VistSplitWriter:
    """One split of a VIST-layout folder being written: each frame's image goes into :attr:`folder` (made
    at once: the loader expects it even for an empty split) and its annotations into the lists, which
    :meth:`write` saves as the split's SIS and DII files (atomically, both with the same images and albums)."""

    root: Path
    split: str
    sis: list[list[dict]] = field(default_factory=list)
    dii: list[list[dict]] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    albums: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = images_dir(self.root, self.split)
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        atomic_write_json(
            sis_path(self.root, self.split), vist_document(self.sis, self.images, self.albums, SIS_TIER)
        )
        atomic_write_json(
            dii_path(self.root, self.split), vist_document(self.dii, self.images, self.albums, DII_TIER)
        )


def _vist_tokenised(text: str) -> str:
    """VIST's ``text`` field: lower-cased with punctuation split off (informational; we use original_text)."""
    out = []
    for word in text.lower().split():
        core = word.rstrip(".,!?;:")
        out.extend([core] if core else [])
        out.extend(word[len(core) :])
    return " ".join(out)
