"""A tiny VIST-format folder with every quirk of the real download.

Stories (split ``train``), annotations shuffled across stories:

* ``99``  usable; numerically before ``101`` (story ids sort as numbers, not strings).
* ``101`` usable; every photo has two DII captions, the longer one must win; JPEG images.
* ``102`` usable; mixed formats: grayscale JPEG, palette GIF, RGBA PNG with transparency, ``.jpeg``, ``.png``.
* ``103`` dropped: one photo has no DII caption.
* ``104`` dropped: one image file is missing.
* ``105`` dropped: one image is corrupt (a truncated JPEG).
* ``106`` dropped: only 4 sentences.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image

from pipeline.data.vist import dii_annotation, dii_path, images_dir, sis_annotation, sis_path, vist_document

SPLIT = "train"
USABLE_IDS = ["99", "101", "102"]
DROPPED = {
    "missing_description": ["103"],
    "missing_image": ["104"],
    "corrupt_image": ["105"],
    "wrong_length": ["106"],
}
GRAY_LEVEL = 77  # the grayscale photo's pixel value, to check L -> RGB conversion


def photo_id(story_id: str, order: int) -> str:
    return f"{story_id}{order:02d}"


def caption(story_id: str, order: int) -> str:
    return f"Story {story_id}, sentence {order}: it's a fine day."


def short_description(story_id: str, order: int) -> str:
    return f"Photo {photo_id(story_id, order)}."


def long_description(story_id: str, order: int) -> str:
    return f"A longer literal description of photo {photo_id(story_id, order)}."


def _rgb(seed: int) -> tuple[int, int, int]:
    rng = random.Random(seed)
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def build_quirky_vist(root: Path) -> Path:
    image_folder = images_dir(root, SPLIT)
    image_folder.mkdir(parents=True)
    sis, dii = [], []
    lengths = {"99": 5, "101": 5, "102": 5, "103": 5, "104": 5, "105": 5, "106": 4}
    for story_id, length in lengths.items():
        album = f"album{story_id}"
        for order in range(length):
            pid = photo_id(story_id, order)
            sis.append(sis_annotation(story_id, album, pid, order, caption(story_id, order)))
            if not (story_id == "103" and order == 2):
                dii.append(dii_annotation(album, pid, order, long_description(story_id, order)))
                if story_id == "101":  # a second, shorter caption for the same photo
                    dii.append(dii_annotation(album, pid, order, short_description(story_id, order)))

            size = (40 + order * 7, 30 + order * 5)  # non-square, varied sizes
            if story_id == "104" and order == 3:
                continue  # missing image
            if story_id == "105" and order == 1:
                buffer = io.BytesIO()
                Image.new("RGB", (64, 64), _rgb(order)).save(buffer, format="JPEG")
                (image_folder / f"{pid}.jpg").write_bytes(buffer.getvalue()[:200])  # truncated JPEG
                continue
            if story_id == "102":
                if order == 0:
                    _save(image_folder / f"{pid}.jpg", Image.new("L", size, GRAY_LEVEL))
                elif order == 1:
                    _save(image_folder / f"{pid}.gif", Image.new("RGB", size, (200, 10, 10)).convert("P"))
                elif order == 2:
                    rgba = Image.new("RGBA", size, (0, 0, 255, 0))  # fully transparent blue
                    _save(image_folder / f"{pid}.png", rgba)
                elif order == 3:
                    _save(image_folder / f"{pid}.jpeg", Image.new("RGB", size, _rgb(order)))
                else:
                    _save(image_folder / f"{pid}.png", Image.new("RGB", size, _rgb(order)))
            else:
                _save(image_folder / f"{pid}.jpg", Image.new("RGB", size, _rgb(order)))

    # The real files are not in story order.
    random.Random(0).shuffle(sis)
    random.Random(1).shuffle(dii)
    for path, records, tier in (
        (sis_path(root, SPLIT), sis, "story-in-sequence"),
        (dii_path(root, SPLIT), dii, "descriptions-in-isolation"),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(vist_document(records, images=[], albums=[], tier=tier)))
    return root
