"""The pre-flight check: every missing model in one error, messages by folder kind, the HF cache, `check`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from PIL import Image

from storypipe import preflight
from storypipe.cli import app
from storypipe.config import resolve_config

runner = CliRunner()


def tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def fake_hub_cache(root, hub_id, files):
    """A Hugging Face hub cache holding ``files`` of ``hub_id`` at one snapshot, laid out as the hub does."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    for name in files:
        path = repo / "snapshots" / revision / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return root


def test_several_missing_local_folders_are_reported_in_one_error(tmp_path):
    overrides = [f"captioner.base_model={tmp_path / 'no-llava'}", "captioner.tiny=null",
                 f"captioner.story_adapter={tmp_path / 'no-adapter'}",
                 f"generator.base_model={tmp_path / 'no-sd'}", "generator.tiny=null"]  # fmt: skip
    cfg = resolve_config(preset="tiny", overrides=overrides)
    with pytest.raises(preflight.MissingModels) as error:
        preflight.require(cfg, "generate")
    assert [model.key for model in error.value.models] == [
        "captioner.base_model", "captioner.story_adapter", "generator.base_model",
    ]  # fmt: skip
    message = str(error.value)
    assert message.startswith("3 models missing")
    for name in ("no-llava", "no-adapter", "no-sd"):
        assert f"the model folder {tmp_path / name} does not exist" in message
    assert "`storypipe pretrain-llava`" in message and "`storypipe finetune-llava --task story`" in message
    assert "`storypipe finetune-storygen`" in message
    assert not any(tmp_path.iterdir())  # nothing built in their place


@pytest.mark.parametrize(
    "key, marker",
    [
        ("generator.base_model", "model_index.json"),
        ("captioner.base_model", "config.json"),
        ("captioner.story_adapter", "adapter_config.json"),
    ],
)
def test_a_folder_without_its_kinds_marker_file_names_that_file(tmp_path, key, marker):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "other.json").write_text("{}")  # exists, but is not this kind of folder
    cfg = resolve_config(preset="tiny", overrides=[f"{key}={folder}"])
    [model] = [model for model in preflight.check(cfg, "generate") if model.key == key]
    assert model.status == preflight.MISSING
    assert f"{folder} is not a" in model.problem and f"it has no {marker}." in model.problem
    others = {"model_index.json", "config.json", "adapter_config.json"} - {marker}
    assert not any(f"no {other}" in model.problem for other in others)


def test_a_hub_id_in_the_hf_cache_is_found_and_one_absent_is_not(tmp_path, monkeypatch):
    cache = fake_hub_cache(tmp_path / "hub", "org/llava", ["config.json", "model.safetensors"])
    fake_hub_cache(cache, "org/sd", ["unet/config.json"])  # a diffusers repo without model_index.json
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = resolve_config(preset="tiny", overrides=["captioner.base_model=org/llava",
                                                   "generator.base_model=org/sd"])  # fmt: skip
    statuses = {model.key: model for model in preflight.check(cfg, "generate")}
    assert statuses["captioner.base_model"].status == preflight.FOUND
    assert statuses["captioner.base_model"].fix == "hf download org/llava"
    sd = statuses["generator.base_model"]
    assert sd.status == preflight.NOT_DOWNLOADED and sd.missing
    assert sd.fix.startswith("hf download org/sd --include 'model_index.json'") and sd.size == "unknown"
    with pytest.raises(preflight.MissingModels) as error:  # the tests run offline: it cannot be downloaded
        preflight.require(cfg, "generate")
    assert [model.key for model in error.value.models] == ["generator.base_model"]
    assert f"org/sd is not in the Hugging Face cache ({cache})" in str(error.value)


def test_known_hub_ids_have_an_expected_size_and_the_tiny_models_are_built_on_first_use():
    statuses = {model.key: model for model in preflight.check(resolve_config(preset="vist"))}
    assert statuses["captioner.base_model"].size == "about 14 GB"
    tiny = {model.key: model.status for model in preflight.check(resolve_config(preset="tiny"))}
    assert tiny["captioner.base_model"] == tiny["eval.clip_model"] == preflight.BUILT_ON_FIRST_USE


def test_check_exits_0_when_every_model_is_there_and_2_otherwise_writing_nothing(
    tmp_path, monkeypatch, storypipe_cache, tiny_llava, tiny_sd
):
    monkeypatch.chdir(tmp_path)
    cache_before = tree(storypipe_cache)
    # The caption baseline names the tiny base too: built by the captioner only when it is the same folder.
    found = ["--set", f"captioner.base_model={tiny_llava}", "--set", f"eval.caption_baseline_model={tiny_llava}",
             "--set", f"generator.base_model={tiny_sd}"]  # fmt: skip
    result = runner.invoke(app, ["check", "--preset", "tiny", *found])
    assert result.exit_code == 0, result.output
    assert "captioner.base_model" in result.output and "models are there" in result.output

    missing = [*found, "--set", f"eval.clip_model={tmp_path / 'no-clip'}",
               "--set", f"captioner.description_adapter={tmp_path / 'no-adapter'}"]  # fmt: skip
    result = runner.invoke(app, ["check", "--preset", "tiny", *missing])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "error: 2 models missing" in output
    assert f"eval.clip_model: the model folder {tmp_path / 'no-clip'} does not exist" in output
    assert f"captioner.description_adapter: the model folder {tmp_path / 'no-adapter'}" in output
    result = runner.invoke(app, ["check", "--preset", "tiny", *missing, "--for", "finetune-llava"])
    assert result.exit_code == 0, result.output  # finetune-llava loads the base only
    assert tree(tmp_path) == [] and tree(storypipe_cache) == cache_before


def test_generate_names_every_missing_model_before_loading_any(tmp_path, monkeypatch, tiny_llava):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model loaded before the pre-flight")

    monkeypatch.setattr("storypipe.wiring.load_captioners", must_not_load)
    monkeypatch.setattr("storypipe.wiring.load_frame_generator", must_not_load)
    seed = tmp_path / "seed.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(seed)
    out = tmp_path / "story"
    result = runner.invoke(app, [
        "generate", "--preset", "tiny", "--image", str(seed), "--caption", "x", "--out", str(out),
        "--set", f"captioner.base_model={tiny_llava}",  # there: the base alone would load first
        "--set", f"captioner.story_adapter={tmp_path / 'no-adapter'}",
        "--set", f"generator.base_model={tmp_path / 'no-sd'}", "--set", "generator.tiny=null",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "error: 2 models missing" in output
    assert f"captioner.story_adapter: the model folder {tmp_path / 'no-adapter'} does not exist" in output
    assert f"generator.base_model: the model folder {tmp_path / 'no-sd'} does not exist" in output
    assert not out.exists()


def test_eval_names_every_missing_model_before_loading_any(tmp_path, monkeypatch, toy_stories):
    from storypipe import tasks

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model loaded before the pre-flight")

    for loader in (
        "load_measures",
        "load_captioners",
        "load_frame_generator",
        "build_missing_tiny_eval_models",
    ):
        monkeypatch.setattr(f"storypipe.wiring.{loader}", must_not_load)
    cfg = resolve_config(preset="tiny", overrides=[f"eval.classifier_model={tmp_path / 'no-classifier'}",
                                                   f"eval.text_baseline_model={tmp_path / 'no-lm'}"])  # fmt: skip
    with pytest.raises(preflight.MissingModels) as error:
        tasks.evaluate(cfg, toy_stories, tmp_path / "eval")
    assert [model.key for model in error.value.models] == [
        "eval.classifier_model",
        "eval.text_baseline_model",
    ]
    assert not (tmp_path / "eval").exists()
