"""The root config: one section per owner, and the presets that ship inside the package.

``configs/*.yaml`` (installed as ``storypipe/presets``) mirror :class:`StorypipeConfig` section by
section. ``--preset NAME`` finds them through the installed package, so a preset works from any directory
and from a wheel; model folders inside a preset are written relative to the preset file itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from eval.config import EvalConfig
from llava_ft.config import CaptionerConfig
from pipeline.config import DataConfig, RuntimeConfig, StoryConfig, ToyDataConfig, load_config
from pipeline.errors import ConfigError
from storygen_ft.config import GeneratorConfig
from toy.config import ClassifierTrainConfig, ClipTrainConfig, TextBaselineTrainConfig

DEFAULT_PRESET = "vist"


@dataclass
class StorypipeConfig:
    """The whole config tree; the presets mirror it section by section."""

    data: DataConfig = field(default_factory=DataConfig)
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    classifier: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    clip_training: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    text_baseline_training: TextBaselineTrainConfig = field(default_factory=TextBaselineTrainConfig)
    story: StoryConfig = field(default_factory=StoryConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def presets_dir() -> Path:
    """The installed presets (in a checkout: a link to the top-level ``configs/``)."""
    return Path(str(resources.files("storypipe") / "presets"))


def preset_names() -> list[str]:
    return sorted(path.stem for path in presets_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``."""
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r}. Available presets: {', '.join(preset_names())}")
    return path


def resolve_config(
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> StorypipeConfig:
    """``--config FILE`` or ``--preset NAME`` (default: the ``vist`` preset), then ``--set`` overrides in
    order, then ``values``: typed command options that mirror a config key (``{"story.frames": 5}``)."""
    if config_file is not None and preset is not None:
        raise ConfigError("give either --config FILE or --preset NAME, not both")
    path = Path(config_file) if config_file is not None else preset_path(preset or DEFAULT_PRESET)
    return load_config(StorypipeConfig, path, overrides, values)
