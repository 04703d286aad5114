"""`storypipe eval` on tiny models: every table filled, resumable from its cache, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from eval.referential_metrics import is_pronoun_caption
from eval.report import intrinsic_labels
from eval.rows import IMAGE_ROWS, TEXT_ROWS
from pipeline.config import ToyDataConfig
from pipeline.data.shapestories import generate_shapestories
from pipeline.data.vist import load_vist_split
from storypipe.cli import app

runner = CliRunner()
IMAGE_COLUMNS = ("text_image", "previous_image", "total_story", "objects_per_image",
                 "character_accuracy", "character_f1", "background_accuracy", "background_f1")  # fmt: skip


@pytest.fixture(scope="module")
def eval_options(tmp_path_factory, tiny_llava, tiny_sd, toy_stories, storypipe_cache):
    """The tiny preset pointed at the session's tiny models, a classifier trained through the CLI, and
    tiny measuring models built on first use (in storypipe's cache, the only place they may be built)."""
    models = storypipe_cache / tmp_path_factory.mktemp("eval-models").name
    classifier = models / "classifier"
    result = runner.invoke(app, ["train-classifier", "--data", str(toy_stories), "--out", str(classifier), "--preset", "tiny",
                                 "--set", "classifier.max_steps=5", "--set", "classifier.image_size=32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Use it with: --set eval.classifier_model=" in result.output
    settings = {
        "captioner.base_model": tiny_llava, "generator.base_model": tiny_sd, "captioner.max_new_tokens": 6,
        "generator.num_inference_steps": 2, "eval.clip_model": models / "clip", "eval.detector_model": models / "detector",
        "eval.caption_baseline_model": tiny_llava, "eval.text_baseline_model": models / "lm",
        "eval.classifier_model": classifier, "story.repetition_retries": 0, "eval.memory_generator_model": tiny_sd,
    }  # fmt: skip
    return [
        "--preset",
        "tiny",
        "--split",
        "train",
        *(a for key, value in settings.items() for a in ("--set", f"{key}={value}")),
    ]


def eval_cli(data, out, options, *extra):
    return runner.invoke(app, ["eval", "--data", str(data), "--out", str(out), *options, *extra])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, eval_options, toy_stories):
    out = tmp_path_factory.mktemp("eval") / "run"
    result = eval_cli(toy_stories, out, eval_options, "--max-stories", "2")
    assert result.exit_code == 0, result.output
    return out


def test_every_table_is_filled(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    assert results["stories"] == 2
    # Every row of the registry: the tiny preset configures every model.
    assert list(results["text"]) == [row.key for row in TEXT_ROWS]
    assert list(results["images"]) == [row.key for row in IMAGE_ROWS]
    assert list(results["intrinsic"]) == list(intrinsic_labels())
    for text_row in TEXT_ROWS:
        row = results["text"][text_row.key]
        assert row["samples"] == 8, text_row.key
        assert all(isinstance(row[key], float) for key in ("meteor", "sentence_similarity", "clip")), text_row
    for image_row in IMAGE_ROWS:
        row = results["images"][image_row.key]
        assert row["frames"] == 8, image_row.key
        assert all(isinstance(row[key], float) for key in IMAGE_COLUMNS), image_row.key
        if not image_row.ground_truth:
            assert all(isinstance(row[key], float) for key in ("gt_image", "fid", "kid")), image_row.key
            assert "(< 2048)" in row["fid_note"]  # too few samples for a reliable FID: said so
    for name in intrinsic_labels():
        assert isinstance(results["intrinsic"][name]["kl_vs_dii"], float)
        assert isinstance(results["intrinsic"][name]["pronouns_per_story"], float)
    markdown = (evaluated / "results.md").read_text()
    for heading in (
        "## Text",
        "## Images",
        "## Intrinsic",
        "Story captions + reference conditioning",
        "Ours: fully autoregressive",
    ):
        assert heading in markdown
    for label in [row.label for row in (*TEXT_ROWS, *IMAGE_ROWS)] + list(intrinsic_labels().values()):
        assert f"| {label} |" in markdown, label
    assert (evaluated / "word_distribution.png").is_file() and (evaluated / "object_counts.png").is_file()
    assert len(list((evaluated / "stories").iterdir())) == 2  # the autoregressive stories, as story folders


def test_descriptions_get_referential_scores_on_shapestories(evaluated, toy_stories):
    row = json.loads((evaluated / "results.json").read_text())["text"]["ours_description"]
    frames = [
        frame for story in load_vist_split(toy_stories, "train").stories[:2] for frame in story.frames[1:]
    ]
    assert row["character_frames"] == 8
    assert row["pronoun_frames"] == sum(is_pronoun_caption(frame.story_caption) for frame in frames) > 0
    assert isinstance(row["character_named"], float) and isinstance(row["pronoun_resolution"], float)
    assert (
        "## Referential accuracy of the descriptions (ShapeStories)" in (evaluated / "results.md").read_text()
    )


def test_a_rerun_reuses_the_cache(evaluated, eval_options, toy_stories):
    cache = sorted((evaluated / "cache").iterdir())
    stamps = [path.stat().st_mtime_ns for path in cache]
    before = json.loads((evaluated / "results.json").read_text())
    result = eval_cli(toy_stories, evaluated, eval_options, "--max-stories", "2")
    assert result.exit_code == 0, result.output
    assert [path.stat().st_mtime_ns for path in cache] == stamps  # nothing regenerated
    assert json.loads((evaluated / "results.json").read_text())["text"] == before["text"]


def test_a_rerun_with_other_generation_settings_regenerates_their_rows(
    evaluated, eval_options, toy_stories, tmp_path
):
    """The issue's example: 3 steps and seed 7 into the folder of a 2-step, seed-0 run."""
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    frames = sorted((copy / "images" / "sd_no_context").iterdir())
    drawn = [frame.read_bytes() for frame in frames]
    before = json.loads((copy / "results.json").read_text())
    settings = ["generator.num_inference_steps=3", "eval.seed=7", "eval.rows=[sd_no_context, ours_ar]"]
    result = eval_cli(
        toy_stories, copy, eval_options, "--max-stories", "2", *(a for s in settings for a in ("--set", s))
    )
    assert result.exit_code == 0, result.output
    # Every frame drawn again, and scored again.
    assert all(frame.read_bytes() != old for frame, old in zip(frames, drawn, strict=True))
    results = json.loads((copy / "results.json").read_text())
    assert results["images"]["sd_no_context"] != before["images"]["sd_no_context"]
    for story in (copy / "stories").iterdir():  # told again from scratch, not mixed with the old telling
        assert not (story / "history").exists()
        assert json.loads((story / "story.json").read_text())["metadata"]["seed"] == 7
        assert yaml.safe_load((story / "config.yaml").read_text())["generator"]["num_inference_steps"] == 3


def test_a_model_folder_with_new_weights_regenerates_its_rows(eval_options, toy_stories, tiny_sd, tmp_path):
    model, out = tmp_path / "sd", tmp_path / "run"
    shutil.copytree(tiny_sd, model)
    options = [*eval_options, "--set", f"generator.base_model={model}", "--set", "eval.rows=[sd_no_context]"]
    result = eval_cli(toy_stories, out, options, "--max-stories", "1")
    assert result.exit_code == 0, result.output
    frames = sorted((out / "images" / "sd_no_context").iterdir())
    drawn = [frame.read_bytes() for frame in frames]
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({name: tensor * 0.5 for name, tensor in load_file(weights).items()}, weights)  # other weights
    result = eval_cli(toy_stories, out, options, "--max-stories", "1")
    assert result.exit_code == 0, result.output
    assert all(frame.read_bytes() != old for frame, old in zip(frames, drawn, strict=True))


def test_a_corrupt_cache_file_is_a_clear_error(evaluated, eval_options, toy_stories, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    victim = sorted((copy / "cache").iterdir())[0]
    victim.write_text(victim.read_text()[:100])  # truncated, as by a full disk
    result = eval_cli(toy_stories, copy, eval_options, "--max-stories", "2")
    assert result.exit_code == 2, result.output
    assert f"error: {victim} is not a valid eval cache file" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_missing_generated_frame_is_a_clear_error(evaluated, eval_options, toy_stories, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    victim = next((copy / "images" / "ours_non_ar").iterdir())
    victim.unlink()
    result = eval_cli(toy_stories, copy, eval_options, "--max-stories", "2")
    assert (
        result.exit_code == 2 and victim.name in result.output and "rerun to regenerate it" in result.output
    )


def test_an_empty_split_and_a_missing_model_are_clear_errors(eval_options, tmp_path):
    data = tmp_path / "one"
    generate_shapestories(data, ToyDataConfig(stories=1, image_size=32))  # val and test are empty
    result = eval_cli(data, tmp_path / "o", eval_options, "--split", "test")
    assert result.exit_code == 2 and "no usable story in split 'test'" in result.output
    result = eval_cli(data, tmp_path / "o", eval_options, "--set", "eval.build_tiny_models=false",
                      "--set", f"eval.clip_model={tmp_path / 'no-clip'}")  # fmt: skip
    assert result.exit_code == 2 and "no-clip" in result.output
