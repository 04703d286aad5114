"""story.json: lossless round trip and strict validation."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.errors import DataError
from pipeline.story import Frame, Story


def _story() -> Story:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)]
    images = [Image.new("RGB", (8, 8), colour) for colour in colours]
    return Story(
        frames=[
            Frame(0, "we went to the fair.", "a family at a fairground", images[0], "seed"),
            Frame(1, "She didn't want the ride to end… ünïcode", None, images[1], "generated"),
            Frame(2, "", "a girl smiles in a ride car", images[2], "edited"),
            Frame(3, "the end.", "fireworks", images[3], "inserted"),
        ],
        metadata={
            "seed": 7,
            "timings_s": {"caption": [0.5, 0.25]},
            "models": {"captioner": "llava"},
            "note": None,
        },
        config={"story": {"frames": 4}},
    )


def test_round_trip_is_lossless(tmp_path):
    story = _story()
    story.save(tmp_path)
    data = json.loads((tmp_path / "story.json").read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert data["frames"][1] == {
        "index": 1,
        "story_caption": "She didn't want the ride to end… ünïcode",
        "description": None,
        "image": "frames/frame_01.png",
        "source": "generated",
    }
    loaded = Story.load(tmp_path)
    assert loaded == story  # captions, metadata, config and every image's pixels
    assert Story.from_json(json.loads(json.dumps(loaded.to_json()))).to_json() == story.to_json()


def test_a_copy_changes_without_touching_the_original():
    story = _story()
    changed = story.copy()
    changed.frames[1].story_caption = "changed"
    changed.metadata["seed"] = 8
    assert story.frames[1].story_caption.startswith("She") and story.metadata["seed"] == 7


def test_an_image_path_that_leads_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "story"
    _story().save(folder)
    data = json.loads((folder / "story.json").read_text())
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    data["frames"][1]["image"] = "../outside.png"
    (folder / "story.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="leads out of the story folder"):
        Story.load(folder)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(version=2), "unsupported story.json version 2"),
        (lambda d: d["frames"][0].update(source="dreamed"), "source must be one of"),
        (lambda d: d["frames"][1].update(index=5), r"frame indices must be 0..3 in order"),
        (lambda d: d["frames"][0].update(image="/abs/frame.png"), "relative to the story folder"),
        (lambda d: d["frames"][0].pop("description"), r"missing \['description'\]"),
        (lambda d: d["frames"][0].update(mood="happy"), r"unknown \['mood'\]"),
        (lambda d: d.update(extra=1), r"unknown top-level keys \['extra'\]"),
    ],
)
def test_invalid_story_json_is_rejected_with_the_reason(tmp_path, mutate, message):
    _story().save(tmp_path)
    data = _story().to_json()
    mutate(data)
    (tmp_path / "story.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        Story.load(tmp_path)


def test_missing_story_json_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"story.json does not exist"):
        Story.load(tmp_path)
