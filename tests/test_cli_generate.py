"""`storypipe generate / edit / insert` end to end with tiny models, and every bad input's error."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.story import Story
from storypipe.cli import app

runner = CliRunner()


@pytest.fixture()
def models(tiny_llava, tiny_sd):
    """--set options pointing the tiny preset at the session's tiny models, with few denoising steps."""
    return ["--preset", "tiny", "--set", f"captioner.base_model={tiny_llava}", "--set", f"generator.base_model={tiny_sd}",
            "--set", "captioner.max_new_tokens=8", "--steps", "3"]  # fmt: skip


@pytest.fixture()
def seed_image(tmp_path):
    path = tmp_path / "seed.png"
    Image.new("RGB", (20, 24), (200, 30, 30)).save(path)  # small on purpose: resized, with a note
    return path


def tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_generate_edit_insert_and_resume(tmp_path, models, seed_image):
    out = tmp_path / "story"
    result = runner.invoke(app, ["generate", "--image", str(seed_image), "--caption", "Rosa waved hello.",
                                 "--frames", "3", "--out", str(out), "--seed", "4", *models])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "the seed image is 20x24; resized to 64x77" in result.output
    assert f"Open {out / 'storyboard.html'}" in result.output
    assert tree(out) == ["config.yaml", "frames", "frames/frame_00.png", "frames/frame_01.png", "frames/frame_02.png",
                         "story.json", "storyboard.html", "storyboard.png"]  # fmt: skip
    story = Story.load(out)
    assert [f.source for f in story.frames] == ["seed", "generated", "generated"]
    assert story.metadata["seed"] == 4 and set(story.metadata["timings_s"]) == {"0", "1", "2"}
    html = (out / "storyboard.html").read_text()
    for frame in story.frames:
        assert (
            f'href="frames/frame_0{frame.index}.png"' in html
        )  # a link to the full frame, and the frame embedded
    assert html.count('src="data:image/jpeg;base64,') == len(story.frames)
    assert "num_inference_steps: 3" in (out / "config.yaml").read_text()

    result = runner.invoke(
        app,
        ["edit", "--story", str(out), "--frame", "1", "--caption", "Then it rained.", "--strength", "0.5"],
    )
    assert result.exit_code == 0, result.output
    edited = Story.load(out)
    assert edited.frames[1].story_caption == "Then it rained." and edited.frames[1].source == "edited"
    assert (out / "history" / "001-edit-frame-01" / "frames" / "frame_01.png").is_file()

    result = runner.invoke(
        app, ["insert", "--story", str(out), "--after", "0", "--caption", "A clown appeared."]
    )
    assert result.exit_code == 0, result.output
    inserted = Story.load(out)
    assert [f.story_caption for f in inserted.frames][1:3] == ["A clown appeared.", "Then it rained."]
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"frame_0{i}.png" for i in range(4)]

    # A crash that lost the last frame: resume regenerates it from the folder's own config.
    data = json.loads((out / "story.json").read_text())
    data["frames"] = data["frames"][:3]
    (out / "story.json").write_text(json.dumps(data))
    result = runner.invoke(app, ["generate", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert len(Story.load(out).frames) == 4


def test_generate_refuses_a_folder_that_is_not_a_story_even_with_overwrite(tmp_path, models, seed_image):
    out = tmp_path / "story"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        result = runner.invoke(
            app,
            [
                "generate",
                "--image",
                str(seed_image),
                "--caption",
                "x",
                "--out",
                str(out),
                *models,
                *overwrite,
            ],
        )
        assert result.exit_code == 2, result.output
        assert "is not empty and holds no story (it has keep.txt)" in " ".join(result.output.split())
        assert tree(out) == ["keep.txt"]


def test_a_long_caption_is_truncated_with_a_warning(tmp_path, models, seed_image):
    caption = "Rosa waved hello to every friend she had in the green meadow " * 8
    result = runner.invoke(app, ["generate", "--image", str(seed_image), "--caption", caption, "--frames", "2",
                                 "--out", str(tmp_path / "s"), *models])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "longer than the text encoder reads; it will be truncated" in result.output


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--image", "{missing}", "--caption", "x"], "does not exist"),
        (["--image", "{text}", "--caption", "x"], "does not decode as an image"),
        (["--image", "{seed}", "--caption", "  "], "the caption is empty"),
        (["--image", "{seed}", "--caption", "x", "--frames", "1"], "must be in 2..20"),
        (["--image", "{seed}", "--caption", "x", "--frames", "21"], "must be in 2..20"),
        (["--image", "{seed}", "--caption", "x", "--set", "captioner.base_model={nowhere}", "--set", "captioner.tiny=null"],
         "captioner.base_model: the model folder {nowhere} does not exist. `storypipe pretrain-llava`"),
        # Only a folder in storypipe's cache is ever built; the tiny settings do not build one elsewhere.
        (["--image", "{seed}", "--caption", "x", "--set", "captioner.base_model={nowhere}"],
         "captioner.base_model: the model folder {nowhere} does not exist"),
        (["--image", "{seed}", "--caption", "x", "--set", "generator.base_model={nowhere}"],
         "make finetune-storygen"),
        (["--image", "{seed}", "--caption", "x", "--set", "runtime.require_gpu=true"], "--set runtime.require_gpu=false"),
        (["--image", "{seed}", "--caption", "x", "--set", "captioner.story_adapter={nowhere}"], "storypipe finetune-llava --task story"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, models, seed_image, arguments, message):
    (tmp_path / "notes.txt").write_text("not an image")
    paths = {
        "missing": tmp_path / "gone.png",
        "text": tmp_path / "notes.txt",
        "seed": seed_image,
        "nowhere": tmp_path / "nowhere",
    }
    arguments = [a.format(**paths) for a in arguments]
    message = message.format(**paths)
    out = tmp_path / "story"
    result = runner.invoke(app, ["generate", *models, *arguments, "--out", str(out)])  # later --set wins
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists() and not (tmp_path / "nowhere").exists()


def test_edit_and_insert_outside_a_story_folder_are_clear_errors(tmp_path):
    for command in (["edit", "--frame", "0"], ["insert", "--after", "0"]):
        result = runner.invoke(app, [command[0], "--story", str(tmp_path), *command[1:], "--caption", "x"])
        assert (
            result.exit_code == 2
            and "holds no story" in result.output
            and "or it is not a story folder" in result.output
        )
