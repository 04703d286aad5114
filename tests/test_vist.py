"""The VIST loader on a fixture with every quirk of the real download (see tests/vist_fixture.py)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.data import vist
from pipeline.data.vist import load_vist_split
from pipeline.errors import DataError
from pipeline.io import load_rgb
from tests.vist_fixture import (
    DROPPED,
    GRAY_LEVEL,
    SPLIT,
    USABLE_IDS,
    build_quirky_vist,
    caption,
    long_description,
)


@pytest.fixture()
def vist_root(tmp_path):
    return build_quirky_vist(tmp_path / "vist")


def test_stories_are_grouped_ordered_and_sorted_by_numeric_id(vist_root):
    split = load_vist_split(vist_root, SPLIT)
    # 103/104/106 fail structurally; 105's corrupt image is only found when decoding.
    assert [s.story_id for s in split.stories] == ["99", "101", "102", "105"]
    assert split.total_stories == 7
    story = split.stories[1]
    assert [f.story_caption for f in story.frames] == [caption("101", k) for k in range(5)]
    assert [f.photo_id for f in story.frames] == [f"101{k:02d}" for k in range(5)]
    assert story.album_id == "album101"


def test_longest_description_wins(vist_root):
    story = load_vist_split(vist_root, SPLIT).stories[1]
    assert [f.description for f in story.frames] == [long_description("101", k) for k in range(5)]


def test_every_drop_is_recorded_by_reason(vist_root):
    split = load_vist_split(vist_root, SPLIT)
    structural = {reason: ids for reason, ids in DROPPED.items() if reason != "corrupt_image"}
    assert split.dropped == structural
    usable = [story.story_id for story, _ in split.iter_usable()]
    assert usable == USABLE_IDS
    assert split.dropped == DROPPED
    counts = split.drop_counts()
    assert counts["corrupt_image"] == 1 and counts["wrong_length"] == 1 and counts["empty_caption"] == 0
    report = "\n".join(split.drop_report())
    for reason in DROPPED:
        assert reason in report
    assert "exactly 5 sentences" in report


def test_grouping_decodes_no_image(vist_root, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(vist.Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    split = load_vist_split(vist_root, SPLIT)
    assert opened == []
    next(split.iter_usable())  # decoding happens lazily, one story at a time
    assert len(opened) == 5


def test_images_are_rgb_whatever_their_mode(vist_root):
    stories = dict(
        (story.story_id, images) for story, images in load_vist_split(vist_root, SPLIT).iter_usable()
    )
    mixed = stories["102"]
    assert all(image.mode == "RGB" for images in stories.values() for image in images)
    assert mixed[0].getpixel((0, 0)) == (GRAY_LEVEL,) * 3  # grayscale JPEG
    assert mixed[1].getpixel((0, 0))[0] > 150  # palette GIF stays red
    assert mixed[2].getpixel((0, 0)) == (255, 255, 255)  # transparent PNG -> white, not blue
    assert [image.size for image in mixed] == [(40 + k * 7, 30 + k * 5) for k in range(5)]


def test_limit_keeps_first_usable_stories_in_id_order(vist_root):
    split = load_vist_split(vist_root, SPLIT)
    assert [story.story_id for story, _ in split.iter_usable(limit=2)] == ["99", "101"]


def test_load_rgb_names_the_corrupt_file(vist_root):
    bad = vist_root / "images" / SPLIT / "10501.jpg"
    with pytest.raises(vist.ImageDecodeError, match="10501.jpg"):
        load_rgb(bad)


def test_missing_files_give_clear_errors(tmp_path, vist_root):
    with pytest.raises(DataError, match=r"val\.story-in-sequence\.json does not exist"):
        load_vist_split(vist_root, "val")
    (vist_root / "dii" / f"{SPLIT}.description-in-isolation.json").write_text("{not json")
    with pytest.raises(DataError, match="description-in-isolation.json is not valid JSON"):
        load_vist_split(vist_root, SPLIT)


def test_malformed_annotation_names_file_and_index(vist_root):
    path = vist_root / "sis" / f"{SPLIT}.story-in-sequence.json"
    data = json.loads(path.read_text())
    del data["annotations"][3][0]["story_id"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"story-in-sequence.json: annotations\[3\] lacks \['story_id'\]"):
        load_vist_split(vist_root, SPLIT)


def test_duplicate_photo_order_is_dropped(vist_root):
    path = vist_root / "sis" / f"{SPLIT}.story-in-sequence.json"
    data = json.loads(path.read_text())
    for item in data["annotations"]:
        if item[0]["story_id"] == "99" and item[0]["worker_arranged_photo_order"] == 4:
            item[0]["worker_arranged_photo_order"] = 3
    path.write_text(json.dumps(data))
    split = load_vist_split(vist_root, SPLIT)
    assert split.dropped["bad_photo_order"] == ["99"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (bytes(range(128, 256)) * 4, "is not valid JSON .*utf-8"),  # a binary file
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"annotations": [], "images": 5}', "'images' must be a list"),
    ],
)
def test_a_hostile_annotation_file_is_a_data_error_naming_it(vist_root, content, expected):
    sis = vist.sis_path(vist_root, "train")
    sis.write_bytes(content)
    with pytest.raises(DataError, match=expected) as caught:
        load_vist_split(vist_root, "train")
    assert str(sis) in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_a_photo_order_that_is_not_a_number_drops_the_story(vist_root):
    sis = vist.sis_path(vist_root, "train")
    data = json.loads(sis.read_text())
    first = data["annotations"][0][0]
    first["worker_arranged_photo_order"] = "third"
    sis.write_text(json.dumps(data))
    loaded = load_vist_split(vist_root, "train")
    assert loaded.dropped[vist.BAD_PHOTO_ORDER] == [str(first["story_id"])]
