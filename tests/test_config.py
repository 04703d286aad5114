"""Config: presets load, and every mistake is an error that names the key and where it came from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.config import config_to_dict, load_config, resolve_model_path, save_resolved_config
from pipeline.errors import ConfigError
from storypipe.api import StoryPipeline
from storypipe.cli import app
from storypipe.config import StorypipeConfig, presets_dir, resolve_config

runner = CliRunner()


def _write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("preset", sorted(p.stem for p in presets_dir().glob("*.yaml")))
def test_presets_load_and_mirror_the_classes_completely(preset):
    """Each preset spells out every key of every section, so a YAML file documents the whole tree; model
    entries are the only values that change on loading: they become the folders they name."""
    path = presets_dir() / f"{preset}.yaml"
    raw = yaml.safe_load(path.read_text())
    loaded = config_to_dict(resolve_config(preset=preset))

    def compare(written, resolved, key):
        if isinstance(written, dict):
            assert isinstance(resolved, dict) and written.keys() == resolved.keys(), key
            for name in written:
                compare(written[name], resolved[name], f"{key}.{name}")
        elif isinstance(written, str) and written != resolved:
            assert resolved == resolve_model_path(written, path.parent), key
            assert Path(resolved).is_absolute(), key
        else:
            assert written == resolved, key

    compare(raw, loaded, preset)


def test_model_folders_in_a_config_file_are_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "exp" / "runs" / "llava").mkdir(parents=True)
    config = _write(tmp_path / "exp", "captioner:\n  base_model: ./runs/llava\n  story_adapter: runs/llava\n"
                                      "generator:\n  base_model: org/model-on-the-hub\n"
                                      "eval:\n  clip_model: cache:tiny/clip\n")  # fmt: skip
    monkeypatch.chdir(tmp_path)  # not the file's folder
    monkeypatch.setenv("STORYPIPE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(StorypipeConfig, config, ["captioner.description_adapter=./exp/runs/llava"])
    folder = str((tmp_path / "exp" / "runs" / "llava").resolve())
    assert cfg.captioner.base_model == folder and cfg.captioner.story_adapter == folder
    assert cfg.captioner.description_adapter == folder  # --set: relative to the working directory
    assert cfg.generator.base_model == "org/model-on-the-hub"  # a hub id stays as written
    assert cfg.eval.clip_model == str((tmp_path / "cache" / "tiny" / "clip").resolve())


def test_the_toy_preset_finds_its_models_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(preset="toy")
    assert Path(cfg.captioner.base_model, "config.json").is_file()
    assert Path(cfg.generator.base_model, "model_index.json").is_file()


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


def test_an_error_in_a_reused_section_names_the_key_the_user_wrote(tmp_path):
    # captioner.train and captioner.pretrain share one class; each error must name its own key.
    with pytest.raises(
        ConfigError, match=r"^--set captioner.pretrain.max_steps=0: captioner.pretrain.max_steps must be"
    ):
        resolve_config(preset="toy", overrides=["captioner.pretrain.max_steps=0"])
    with pytest.raises(
        ConfigError, match=r"^--set captioner.train.max_steps=0: captioner.train.max_steps must be"
    ):
        resolve_config(preset="toy", overrides=["captioner.train.max_steps=0"])
    path = _write(tmp_path, "captioner:\n  pretrain:\n    learning_rate: -1\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: captioner.pretrain.learning_rate must be > 0, got -1"):
        resolve_config(config_file=path)


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


# --------------------------------------------------------------------------------------------
# Hostile config files: each is one ConfigError line that names the file, never a traceback or a hang
# --------------------------------------------------------------------------------------------


def _laughs(levels: int) -> str:
    """A "billion laughs": ``levels`` lists of 9 aliases of the one before, 9**levels values in all."""
    nodes = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    nodes += [f"&l{level} [{', '.join([f'*l{level - 1}'] * 9)}]" for level in range(1, levels)]
    return f"[{', '.join(nodes)}]"


HOSTILE_CONFIGS = {
    "binary": (bytes(range(256)) * 4, "is not UTF-8 text"),
    "control characters": (b"data:\x00\x01\n", r"is not valid YAML: (special|control) characters .*#x0000"),
    "python tag": (b"!!python/object/apply:os.system ['true']\n", r"not valid YAML: .*tag.* at line 1"),
    "not a mapping": (b"- data\n- toy\n", "must hold a mapping of sections, got list"),
    # Our own depth check, or libyaml's (when PyYAML has it), whichever comes first.
    "deep nesting": (
        b"[" * 20_000 + b"]" * 20_000,
        "nests mappings or lists more than|exceeded maximum nesting depth",
    ),
    "alias bomb": (f"data:\n  image_size: {_laughs(6)}\n".encode(), "once its aliases .* are expanded"),
    "empty": (b"", "is empty"),
    "only comments": (b"# nothing here\n", "is empty"),
    "huge": (b"# " + b"x" * (2 * 1024 * 1024) + b"\n", "is larger than"),
    "5000-digit number": (b"data:\n  image_size: " + b"9" * 5000 + b"\n", "a value could not be read"),
    "number as key": (b"1: 2\n", "the key 1 is not a name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_a_hostile_config_file_is_one_config_error_naming_the_file(case, tmp_path):
    data, expected = HOSTILE_CONFIGS[case]
    path = tmp_path / "cfg.yaml"
    path.write_bytes(data)
    for load in (lambda: load_config(StorypipeConfig, path), lambda: StoryPipeline.from_config(path)):
        with pytest.raises(ConfigError, match=expected) as info:
            load()
        message = str(info.value)
        assert str(path) in message and len(message.splitlines()) == 1 and len(message) < 400, message


def test_a_folder_given_as_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder"):
        load_config(StorypipeConfig, tmp_path)


def test_a_hostile_set_value_is_one_config_error():
    with pytest.raises(
        ConfigError,
        match=r"^--set 'data.image_size=\[\[.*(nests mappings or lists|exceeded maximum nesting depth)",
    ):
        resolve_config(preset="tiny", overrides=["data.image_size=" + "[" * 5000 + "]" * 5000])
    with pytest.raises(
        ConfigError, match=r"data.image_size must be an integer, got \[\[\[.*\.\.\.\]\]\] \(list\)$"
    ):
        resolve_config(preset="tiny", overrides=["data.image_size=" + str([[list(range(1000))]])])


@pytest.mark.parametrize("command", [["show-config"], ["generate", "--caption", "Hi.", "--image"]])
@pytest.mark.parametrize("case", ["binary", "deep nesting", "empty"])
def test_cli_hostile_config_file_exits_2_with_one_error_line(command, case, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(HOSTILE_CONFIGS[case][0])
    seed = tmp_path / "seed.png"
    seed.write_bytes(b"")
    args = [*command, str(seed)] if command[0] == "generate" else command
    result = runner.invoke(app, [*args, "--config", str(path)], catch_exceptions=False)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.output
