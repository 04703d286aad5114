"""`storypipe finetune-llava` and `storypipe caption` end to end with the tiny preset, offline."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from llava_ft.train import FinetuneRun, train
from pipeline.training import read_log
from storypipe.cli import app
from tests.llava_fixtures import CAPTIONS, tiny_captioner_config

runner = CliRunner()


def test_finetune_then_caption_with_the_tiny_preset(tmp_path, llava_samples, storypipe_cache):
    # Not built yet: the tiny preset builds its base on first use, in storypipe's cache only.
    base = storypipe_cache / tmp_path.name / "tiny-base"
    common = ["--preset", "tiny", "--set", f"captioner.base_model=cache:{tmp_path.name}/tiny-base",
              "--set", "captioner.train.max_steps=3"]  # fmt: skip
    for task, data in (("story", "story.json"), ("description", "description.json")):
        result = runner.invoke(app, [
            "finetune-llava", "--task", task, "--data", str(llava_samples / data),
            "--images", str(llava_samples / "images"), "--out", str(tmp_path / task), *common,
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"--set captioner.{task}_adapter={tmp_path / task}" in result.output
        if task == "story":
            built_at = (base / "model.safetensors").stat().st_mtime_ns
    assert (base / "model.safetensors").stat().st_mtime_ns == built_at  # cached, not rebuilt
    assert len(read_log(tmp_path / "story" / "train_log.jsonl")) == 3
    assert "base_model: " + str(base) in (tmp_path / "story" / "config.yaml").read_text()

    image = llava_samples / "images" / "0.jpg"
    adapters = ["--set", f"captioner.story_adapter={tmp_path / 'story'}",
                "--set", f"captioner.description_adapter={tmp_path / 'description'}"]  # fmt: skip
    result = runner.invoke(
        app, ["caption", "--image", str(image), "--caption", CAPTIONS[0], *common, *adapters]
    )
    assert result.exit_code == 0, result.output
    assert "Next story caption:" in result.output and "Description of the next frame:" in result.output
    assert "zero-shot" not in result.output

    result = runner.invoke(
        app, ["caption", "--image", str(image), "--caption", CAPTIONS[0], "--next-caption", "Then.", *common]
    )
    assert result.exit_code == 0, result.output
    assert (
        "no story adapter configured" in result.output
        and "no description adapter configured" in result.output
    )
    assert "Next story caption:" not in result.output  # given on the command line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--caption", "  "], "the caption is empty"),
        (["--caption", "x", "--image", "/nowhere/seed.jpg"], "does not exist"),
    ],
)
def test_caption_rejects_bad_input(tmp_path, args, message):
    image = ["--image", str(tmp_path / "x.jpg")] if "--image" not in args else []
    (tmp_path / "x.jpg").write_bytes(b"")
    result = runner.invoke(app, ["caption", *image, *args, "--preset", "tiny"])
    assert result.exit_code == 2 and message in result.output


def test_caption_rejects_a_non_image(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    result = runner.invoke(
        app, ["caption", "--image", str(tmp_path / "notes.txt"), "--caption", "x", "--preset", "tiny"]
    )
    assert result.exit_code == 2 and "notes.txt does not decode as an image" in result.output


def test_finetune_rejects_an_unknown_task(tmp_path, llava_samples):
    result = runner.invoke(app, [
        "finetune-llava", "--task", "poem", "--data", str(llava_samples / "story.json"),
        "--images", str(llava_samples / "images"), "--out", str(tmp_path / "x"), "--preset", "tiny",
    ])  # fmt: skip
    assert result.exit_code == 2
    assert result.output == (
        "error: Invalid value for '--task': 'poem' is not one of 'story', 'description'. "
        "(see `storypipe finetune-llava --help`)\n"
    )


def test_gradient_checkpointing_does_not_change_the_losses(tiny_llava, llava_samples, tmp_path):
    logs = []
    for checkpointing in (False, True):
        cfg = tiny_captioner_config(tiny_llava, max_steps=3)
        cfg.gradient_checkpointing = checkpointing
        out = tmp_path / f"gc-{checkpointing}"
        train(FinetuneRun(cfg, "story", llava_samples / "story.json", llava_samples / "images", out))
        logs.append([record["loss"] for record in read_log(out / "train_log.jsonl")])
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)


def test_missing_base_model_names_the_path(tmp_path):
    (tmp_path / "seed.png").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "seed.png")
    missing = tmp_path / "no-such-llava"
    result = runner.invoke(app, [
        "caption", "--image", str(tmp_path / "seed.png"), "--caption", "x", "--preset", "tiny",
        "--set", f"captioner.base_model={missing}", "--set", "captioner.tiny=null",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert str(missing) in result.output and "captioner.base_model" in result.output
