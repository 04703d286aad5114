"""story.json: lossless round trip and strict validation."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import DataError
from pipeline.story import Frame, Story


def _story() -> Story:
    return Story(
        frames=[
            Frame(0, "we went to the fair.", "a family at a fairground", "frames/frame_00.png", "seed"),
            Frame(1, "She didn't want the ride to end… ünïcode", None, "frames/frame_01.png", "generated"),
            Frame(2, "", "a girl smiles in a ride car", "frames/frame_02.png", "edited"),
            Frame(3, "the end.", "fireworks", "frames/frame_03.png", "inserted"),
        ],
        metadata={
            "seed": 7,
            "timings_s": {"caption": [0.5, 0.25]},
            "models": {"captioner": "llava"},
            "note": None,
        },
    )


def test_round_trip_is_lossless(tmp_path):
    story = _story()
    path = story.save(tmp_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert data["frames"][1] == {
        "index": 1,
        "story_caption": "She didn't want the ride to end… ünïcode",
        "description": None,
        "image": "frames/frame_01.png",
        "source": "generated",
    }
    loaded = Story.load(tmp_path)
    assert loaded == story
    assert Story.from_json(json.loads(json.dumps(loaded.to_json()))).to_json() == story.to_json()


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
    data = _story().to_json()
    mutate(data)
    (tmp_path / "story.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        Story.load(tmp_path)


def test_missing_story_json_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"story.json does not exist"):
        Story.load(tmp_path)
