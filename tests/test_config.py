"""Config: presets load, and every mistake is an error that names the key and where it came from."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import PRESETS_DIR, config_to_dict, load_config, save_resolved_config
from pipeline.errors import ConfigError
from storypipe.cli import app
from storypipe.wiring import StorypipeConfig, resolve_config

runner = CliRunner()


def _write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_presets_load_and_mirror_the_classes_completely(preset):
    """Each preset spells out every key of every section, so a YAML file documents the whole tree."""
    cfg = resolve_config(preset=preset)
    raw = yaml.safe_load((PRESETS_DIR / f"{preset}.yaml").read_text())
    assert raw == config_to_dict(cfg)


def test_real_and_tiny_presets_differ_where_it_matters():
    vist, tiny = resolve_config(preset="vist"), resolve_config(preset="tiny")
    assert vist.captioner.base_model == "llava-hf/llava-1.5-7b-hf"
    assert vist.generator.resolution == 512 and vist.captioner.load_in_4bit
    assert tiny.generator.resolution < vist.generator.resolution and not tiny.captioner.load_in_4bit


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path, "data:\n  image_szie: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(StorypipeConfig, path)
    message = str(info.value)
    assert (
        str(path) in message
        and "'data.image_szie'" in message
        and "did you mean 'data.image_size'" in message
    )


def test_unknown_section_and_wrong_types(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown config key 'dataa'"):
        load_config(StorypipeConfig, _write(tmp_path, "dataa: {}\n"))
    with pytest.raises(ConfigError, match=r"cfg.yaml: data.image_size must be an integer, got '64px'"):
        load_config(StorypipeConfig, _write(tmp_path, "data:\n  image_size: 64px\n"))
    with pytest.raises(ConfigError, match=r"captioner.load_in_4bit must be true or false"):
        load_config(StorypipeConfig, _write(tmp_path, "captioner:\n  load_in_4bit: 1\n"))
    with pytest.raises(ConfigError, match=r"cfg.yaml: generator.resolution must be a positive multiple of 8"):
        load_config(StorypipeConfig, _write(tmp_path, "generator:\n  resolution: 500\n"))


def test_overrides_apply_in_order_and_errors_name_the_override(tmp_path):
    path = _write(tmp_path, "data:\n  image_size: 64\n")
    cfg = load_config(
        StorypipeConfig, path, ["data.image_size=128", "captioner.temperature=0.7", "data.image_size=256"]
    )
    assert cfg.data.image_size == 256 and cfg.captioner.temperature == 0.7
    assert cfg.captioner.story_adapter is None
    assert (
        load_config(StorypipeConfig, path, ["captioner.story_adapter=runs/story"]).captioner.story_adapter
        == "runs/story"
    )
    with pytest.raises(ConfigError, match=r"--set data.image_size=big: data.image_size must be an integer"):
        load_config(StorypipeConfig, path, ["data.image_size=big"])
    with pytest.raises(
        ConfigError, match=r"--set captioner.temprature=1: unknown config key 'captioner.temprature'"
    ):
        load_config(StorypipeConfig, path, ["captioner.temprature=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(StorypipeConfig, path, ["data.image_size"])


def test_overrides_reach_into_optional_sections_only_where_the_preset_gives_them():
    toy = resolve_config(
        preset="toy", overrides=["captioner.pretrain.max_steps=7", "generator.tiny.norm_groups=4"]
    )
    assert toy.captioner.pretrain.max_steps == 7 and toy.generator.tiny.norm_groups == 4
    with pytest.raises(ConfigError, match="unknown config key 'captioner.pretrain.max_stepz'"):
        resolve_config(preset="toy", overrides=["captioner.pretrain.max_stepz=7"])
    with pytest.raises(ConfigError, match="captioner.pretrain is not a section"):  # null in the vist preset
        resolve_config(preset="vist", overrides=["captioner.pretrain.max_steps=7"])


def test_config_and_preset_are_exclusive_and_presets_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        resolve_config(config_file=_write(tmp_path, "{}"), preset="tiny")
    with pytest.raises(ConfigError, match="no preset named 'huge'.*Available presets: .*tiny"):
        resolve_config(preset="huge")


def test_resolved_config_round_trips_through_its_file(tmp_path):
    cfg = resolve_config(preset="tiny", overrides=["data.image_size=96", "captioner.top_p=0.5"])
    path = save_resolved_config(cfg, tmp_path / "run")
    reloaded = load_config(StorypipeConfig, path)
    assert dataclasses.asdict(reloaded) == dataclasses.asdict(cfg)


def test_cli_config_errors_exit_2_with_one_clear_line(tmp_path):
    result = runner.invoke(app, ["show-config", "--preset", "tiny", "--set", "data.imagesize=3"])
    assert result.exit_code == 2
    assert "unknown config key 'data.imagesize'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["show-config", "--preset", "tiny", "--set", "toy.seed=7"])
    assert result.exit_code == 0 and yaml.safe_load(result.output)["toy"]["seed"] == 7
