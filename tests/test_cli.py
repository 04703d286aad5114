"""The `storypipe` command line end to end: toy-data feeds prepare-llava unchanged."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from pipeline.data.vist import load_vist_split
from storypipe.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("toy-data", "prepare-llava", "show-config"):
        assert command in result.output


def test_toy_data_then_prepare_llava(tmp_path):
    toy, llava = tmp_path / "toy", tmp_path / "llava"
    result = runner.invoke(
        app, ["toy-data", "--out", str(toy), "--stories", "20", "--seed", "5", "--preset", "tiny"]
    )
    assert result.exit_code == 0, result.output
    assert "Wrote 20 stories (train 16, val 2, test 2)" in result.output
    saved = yaml.safe_load((toy / "config.yaml").read_text())
    assert saved["toy"]["stories"] == 20 and saved["toy"]["seed"] == 5

    result = runner.invoke(app, [
        "prepare-llava", "--vist-dir", str(toy), "--split", "train", "--out", str(llava),
        "--limit", "10", "--image-size", "32", "--preset", "tiny",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Usable stories: 10" in result.output and "Dropped stories: 0" in result.output

    stories = load_vist_split(toy, "train").stories[:10]
    samples = json.loads((llava / "description.json").read_text())
    assert len(samples) == 40
    # Sample k of a story asks for the description of frame k+1, given frame k's image.
    first = stories[0]
    assert (
        samples[1]["id"] == f"{first.story_id}_1" and samples[1]["image"] == f"{first.frames[1].photo_id}.jpg"
    )
    assert samples[1]["conversations"][1]["value"] == first.frames[2].description
    assert (
        f"Current frame story caption: '{first.frames[2].story_caption}'"
        in samples[1]["conversations"][0]["value"]
    )
    assert len(list((llava / "images").iterdir())) == 40
