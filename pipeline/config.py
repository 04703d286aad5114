"""Typed configuration: dataclasses validated in ``__post_init__``, read strictly from YAML.

Each stage owns its section (``llava_ft.config``, ``storygen_ft.config``, ``eval.config``); this module
holds the sections that every stage shares and the machinery that turns a YAML preset plus
``--set section.key=value`` overrides into a tree of those dataclasses. An unknown or mistyped key is
an error that names the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from pipeline.errors import ConfigError
from pipeline.io import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "configs"
DEFAULT_PRESET = "vist"
RESOLVED_CONFIG_NAME = "config.yaml"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Sections shared by every stage
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """How stories are read and how the captioners' training images are written."""

    story_length: int = 5  # VIST stories have exactly 5 sentences; others are dropped.
    image_size: int = 512  # side of the square JPEGs that `prepare-llava` writes.
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        _require(self.story_length >= 2, "data.story_length", "must be at least 2")
        _require(self.image_size >= 8, "data.image_size", "must be at least 8 pixels")
        _require(1 <= self.jpeg_quality <= 100, "data.jpeg_quality", "must be in 1..100")


@dataclass
class ToyDataConfig:
    """ShapeStories, the procedurally generated story world (see ``pipeline.data.shapestories``)."""

    stories: int = 1000
    seed: int = 0
    image_size: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        _require(self.stories >= 1, "toy.stories", "must be at least 1")
        _require(self.image_size >= 32, "toy.image_size", "must be at least 32 pixels")
        for name in ("val_fraction", "test_fraction"):
            _require(0.0 <= getattr(self, name) < 1.0, f"toy.{name}", "must be in [0, 1)")
        _require(
            self.val_fraction + self.test_fraction < 1.0, "toy", "val_fraction + test_fraction must be < 1"
        )


@dataclass
class StoryConfig:
    """The autoregressive story loop (``storypipe generate``)."""

    frames: int = 5  # including the seed frame; VIST stories have 5
    seed: int = 0
    # Repetition guard: a new story caption this similar to an earlier one is resampled with a new seed.
    repetition_retries: int = 3
    repetition_threshold: float = 0.8
    repetition_rule: Literal["token_overlap", "char_ratio"] = "token_overlap"
    # Seed images outside this range (shorter side, pixels) are resized, with a note.
    min_seed_side: int = 64
    max_seed_side: int = 2048

    def __post_init__(self) -> None:
        _require(
            MIN_FRAMES <= self.frames <= MAX_FRAMES, "story.frames", f"must be in {MIN_FRAMES}..{MAX_FRAMES}"
        )
        _require(self.repetition_retries >= 0, "story.repetition_retries", "must be >= 0")
        _require(0 < self.repetition_threshold <= 1, "story.repetition_threshold", "must be in (0, 1]")
        _require(
            0 < self.min_seed_side <= self.max_seed_side, "story.min_seed_side", "must be in 1..max_seed_side"
        )


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The real preset's models are too slow for a CPU; it says so instead of silently taking hours.
    require_gpu: bool = False


MIN_FRAMES, MAX_FRAMES = 2, 20


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key} {message}")


# --------------------------------------------------------------------------------------------
# Loading: YAML -> dataclasses, strictly
# --------------------------------------------------------------------------------------------


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name`` in ``configs/``."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(
            f"no preset named {name!r}: {path} does not exist. Available presets: {', '.join(available)}"
        )
    return path


def load_config(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read ``path`` into ``cls``, then apply ``section.key=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    config = from_dict(cls, raw, source=str(path))
    for override in overrides:
        # Re-validate after each override so an error names the override that caused it.
        _apply_override(raw, override, cls)
        config = from_dict(cls, raw, source=f"--set {override}")
    return config


def _apply_override(raw: dict, override: str, cls: type) -> None:
    key, sep, value_text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. --set data.image_size=256")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML: {exc}") from exc
    parts = key.split(".")
    node: dict = raw
    node_cls: Any = cls
    for depth, part in enumerate(parts[:-1]):
        # Validate the path against the schema so a typo names the override, not the preset file.
        node_cls = _field_type(node_cls, part, source=f"--set {override}", prefix=".".join(parts[:depth]))
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    _field_type(node_cls, parts[-1], source=f"--set {override}", prefix=".".join(parts[:-1]))
    node[parts[-1]] = value


def _field_type(cls: Any, name: str, source: str, prefix: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{source}: {prefix or '<root>'} is not a section")
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ConfigError(_unknown_key_message(cls, name, source, prefix))
    # An optional section (``Settings | None``) is a section too, when the preset gives it.
    sections = [arg for arg in typing.get_args(hints[name]) if dataclasses.is_dataclass(arg)]
    return sections[0] if len(sections) == 1 else hints[name]


def _unknown_key_message(cls: Any, name: str, source: str, prefix: str) -> str:
    known = [f.name for f in dataclasses.fields(cls)]
    full = f"{prefix}.{name}" if prefix else name
    message = f"{source}: unknown config key {full!r}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        message += f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)"
    return message + f". Known keys{' in ' + prefix if prefix else ''}: {', '.join(known)}"


def from_dict(cls: type[T], data: dict, source: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or '<root>'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(_unknown_key_message(cls, key, source, prefix))
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(hints[key], value, source, full)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, key)
            except ConfigError:
                continue
        raise wrong(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise wrong("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong(f"a list of {_type_name(args[0]) if args else 'values'}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, item, source, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong("a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    raise ConfigError(f"{source}: {key} has a type the config loader does not support: {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", repr(tp))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def config_to_dict(config: Any) -> dict:
    """Plain-data view of a config tree (tuples become lists so YAML stays readable)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def save_resolved_config(config: Any, folder: str | Path) -> Path:
    """Write the fully resolved config into ``folder/config.yaml`` (atomically) and return its path."""
    path = Path(folder) / RESOLVED_CONFIG_NAME
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


__all__ = [
    "DataConfig",
    "RuntimeConfig",
    "StoryConfig",
    "ToyDataConfig",
    "DEFAULT_PRESET",
    "PRESETS_DIR",
    "RESOLVED_CONFIG_NAME",
    "config_to_dict",
    "from_dict",
    "load_config",
    "preset_path",
    "save_resolved_config",
]
