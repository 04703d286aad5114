"""`prepare-llava` writes exactly the source paper's samples, reports every drop, and is reproducible."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from llava_ft.prepare import prepare_llava
from pipeline.config import DataConfig
from storypipe.cli import app
from tests.vist_fixture import SPLIT, USABLE_IDS, build_quirky_vist, caption, long_description, photo_id

runner = CliRunner()


@pytest.fixture()
def vist_root(tmp_path):
    return build_quirky_vist(tmp_path / "vist")


def _expected_samples(story_id: str) -> tuple[list[dict], list[dict]]:
    story_next, description = [], []
    for k in range(4):
        image = f"{photo_id(story_id, k)}.jpg"
        current, upcoming = caption(story_id, k), caption(story_id, k + 1)
        story_next.append(
            {
                "id": f"{story_id}_{k}",
                "image": image,
                "conversations": [
                    {
                        "from": "human",
                        "value": f"<image>\nCurrent frame story caption: '{current}', What is the next frame story caption?",
                    },
                    {"from": "gpt", "value": upcoming},
                ],
            }
        )
        description.append(
            {
                "id": f"{story_id}_{k}",
                "image": image,
                "conversations": [
                    {
                        "from": "human",
                        "value": (
                            f"<image>\nPrevious frame story caption: '{current}', Current frame story caption: "
                            f"'{upcoming}', What is the description of this caption?"
                        ),
                    },
                    {"from": "gpt", "value": long_description(story_id, k + 1)},
                ],
            }
        )
    return story_next, description


def test_writes_exactly_the_papers_samples(vist_root, tmp_path):
    out = tmp_path / "llava"
    report = prepare_llava(vist_root, SPLIT, out, DataConfig(image_size=48))

    expected_next, expected_description = [], []
    for story_id in USABLE_IDS:
        story_next, description = _expected_samples(story_id)
        expected_next += story_next
        expected_description += description
    assert json.loads((out / "story_next.json").read_text()) == expected_next
    assert json.loads((out / "description.json").read_text()) == expected_description
    assert report.usable_stories == 3
    assert report.samples == {"story_next.json": 12, "description.json": 12, "caption.json": 12}
    # The pretraining samples: each frame's own image -> its own description, with the fixed question.
    captions = json.loads((out / "caption.json").read_text())
    assert [c["image"] for c in captions] == [s["image"] for s in expected_next]
    assert captions[0]["conversations"][0]["value"] == "<image>\nWhat does this frame show?"
    assert [c["conversations"][1]["value"] for c in captions[:4]] == [
        long_description(USABLE_IDS[0], k) for k in range(4)
    ]
    assert report.dropped == {
        "wrong_length": 1,
        "missing_description": 1,
        "missing_image": 1,
        "corrupt_image": 1,
    }

    # Only the images the samples use (frames 0..3), each an RGB square JPEG.
    written = sorted(p.name for p in (out / "images").iterdir())
    assert written == sorted(f"{photo_id(s, k)}.jpg" for s in USABLE_IDS for k in range(4))
    for path in (out / "images").iterdir():
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48))


def test_limit_and_rerun_give_identical_files(vist_root, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    prepare_llava(vist_root, SPLIT, first, DataConfig(image_size=32), limit=2)
    prepare_llava(vist_root, SPLIT, second, DataConfig(image_size=32), limit=2)
    prepare_llava(vist_root, SPLIT, second, DataConfig(image_size=32), limit=2)  # rerun into the same folder
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    ids = [sample["id"] for sample in json.loads((first / "story_next.json").read_text())]
    assert ids == [f"{s}_{k}" for s in ("99", "101") for k in range(4)]


def test_cli_reports_usable_samples_and_drops(vist_root, tmp_path):
    out = tmp_path / "llava"
    result = runner.invoke(
        app,
        [
            "prepare-llava",
            "--vist-dir",
            str(vist_root),
            "--split",
            SPLIT,
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--image-size",
            "40",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Usable stories: 3" in result.output
    assert "story_next.json: 12" in result.output and "description.json: 12" in result.output
    assert "Dropped stories: 4" in result.output
    for reason in ("wrong_length", "missing_description", "missing_image", "corrupt_image"):
        assert reason in result.output
    assert "data:\n  story_length: 5\n  image_size: 40" in (out / "config.yaml").read_text()
    with Image.open(next((out / "images").iterdir())) as image:
        assert image.size == (40, 40)


def test_cli_missing_vist_folder_is_a_clear_error(tmp_path):
    result = runner.invoke(
        app, ["prepare-llava", "--vist-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert result.output.startswith(
        f"error: Invalid value for '--vist-dir': Directory '{tmp_path / 'nope'}' does not exist"
    )
    assert not (tmp_path / "o").exists()
    (tmp_path / "empty").mkdir()  # a folder, but not a VIST one
    result = runner.invoke(
        app, ["prepare-llava", "--vist-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "train.story-in-sequence.json does not exist" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_warns_when_no_story_is_usable(vist_root, tmp_path):
    result = runner.invoke(app, [
        "prepare-llava", "--vist-dir", str(vist_root), "--split", SPLIT, "--out", str(tmp_path / "o"),
        "--set", "data.story_length=6",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Usable stories: 0" in result.output and "no usable stories in split 'train'" in result.output
    assert "7 stories wrong_length: does not have exactly 6 sentences" in result.output
    assert json.loads((tmp_path / "o" / "story_next.json").read_text()) == []
