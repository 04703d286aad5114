"""Typed configuration: dataclasses validated in ``__post_init__``, read strictly from YAML.

Each stage owns its section (``llava_ft.config``, ``storygen_ft.config``, ``eval.config``); this module
holds the sections that every stage shares and the machinery that turns a YAML preset plus
``--set section.key=value`` overrides into a tree of those dataclasses. An unknown or mistyped key is
an error that names the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml

from pipeline.errors import ConfigError, InvalidConfigValue
from pipeline.io import atomic_write_text
from pipeline.story import MAX_FRAMES, MAX_SEED, MIN_FRAMES, is_valid_seed

RESOLVED_CONFIG_NAME = "config.yaml"

# Bounds on what a config file may hold, checked before it is turned into Python objects. The presets
# are about 6 KB, 3 levels deep and a few hundred values; a file far outside these is not a config
# (a binary, a log) or is built to exhaust memory (a "billion laughs" of nested aliases).
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 64  # nested mappings and lists
MAX_CONFIG_VALUES = 100_000  # values once aliases are expanded
QUOTED_VALUE_CHARS = 60
# libyaml's safe loader when PyYAML has it (its wheels do): the same documents, several times faster.
YAML_LOADER = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)  # how much of a wrong value an error message quotes

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Model folders: where a config entry that names a model points
# --------------------------------------------------------------------------------------------

MODEL_PATH = "model path"  # marks a config field that names a model: a hub id or a folder
ModelPath = Annotated[str, MODEL_PATH]
CACHE_PREFIX = "cache:"  # `cache:tiny/llava`: a folder in storypipe's cache (see cache_dir)


def cache_dir() -> Path:
    """storypipe's cache: ``$STORYPIPE_CACHE``, else ``$XDG_CACHE_HOME/storypipe``, else ``~/.cache/storypipe``."""
    if os.environ.get("STORYPIPE_CACHE"):
        return Path(os.environ["STORYPIPE_CACHE"]).expanduser().resolve()
    return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "storypipe").resolve()


def in_cache(path: str | Path) -> bool:
    """True for a folder inside :func:`cache_dir`: the only place storypipe may build a model by itself."""
    return Path(path).resolve().is_relative_to(cache_dir())


def resolve_model_path(value: str, base: Path) -> str:
    """Where a model entry points, as an absolute folder when it names one.

    ``./x`` and ``../x`` are relative to ``base`` (a config file's folder, or the working directory for
    ``--set``); ``~/x`` is in the home folder; ``cache:x`` is in :func:`cache_dir`. A plain ``name`` that
    is an existing folder under ``base`` is that folder; anything else is left as written: a Hugging
    Face hub id such as ``llava-hf/llava-1.5-7b-hf``.
    """
    if value.startswith(CACHE_PREFIX):
        return str(cache_dir() / value[len(CACHE_PREFIX) :])
    if value.startswith("~"):
        return str(Path(value).expanduser().resolve())
    if value.startswith(("./", "../")) or value in (".", "..") or Path(value).is_absolute():
        return str((base / value).resolve())
    if value and (base / value).is_dir():
        return str((base / value).resolve())
    return value


def _is_model_path(tp: Any) -> bool:
    """``ModelPath`` or ``ModelPath | None``."""
    if typing.get_origin(tp) is Annotated:
        return MODEL_PATH in tp.__metadata__
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_is_model_path(arg) for arg in typing.get_args(tp))
    return False


def model_path_fields(section: Any) -> tuple[str, ...]:
    """The fields of a config section (a dataclass instance) that name a model: a hub id or a folder."""
    hints = typing.get_type_hints(type(section), include_extras=True)
    return tuple(f.name for f in dataclasses.fields(section) if _is_model_path(hints[f.name]))


def _resolve_model_paths(cls: Any, raw: dict, base: Path) -> None:
    """Resolve, in place, every model entry of a raw config tree read from a file in folder ``base``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for key, value in raw.items():
        tp = hints.get(key)
        if tp is None:
            continue  # an unknown key: from_dict reports it
        if _is_model_path(tp) and isinstance(value, str):
            raw[key] = resolve_model_path(value, base)
        elif isinstance(value, dict):
            sections = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
            if sections:
                _resolve_model_paths(sections[0], value, base)


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
        validate(self, [
            (self.story_length >= 2, "story_length", "must be at least 2"),
            (self.image_size >= 8, "image_size", "must be at least 8 pixels"),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in 1..100"),
        ])  # fmt: skip


@dataclass
class ToyDataConfig:
    """ShapeStories, the procedurally generated story world (see ``pipeline.data.shapestories``)."""

    stories: int = 1000
    seed: int = 0
    image_size: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        validate(self, [
            (self.stories >= 1, "stories", "must be at least 1"),
            (self.image_size >= 32, "image_size", "must be at least 32 pixels"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)"),
            (0.0 <= self.test_fraction < 1.0, "test_fraction", "must be in [0, 1)"),
            (self.val_fraction + self.test_fraction < 1.0, "test_fraction", "plus val_fraction must be < 1"),
        ])  # fmt: skip


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
        validate(self, [
            (MIN_FRAMES <= self.frames <= MAX_FRAMES, "frames", f"must be in {MIN_FRAMES}..{MAX_FRAMES}"),
            (is_valid_seed(self.seed), "seed", f"must be an integer in 0..{MAX_SEED}"),
            (self.repetition_retries >= 0, "repetition_retries", "must be >= 0"),
            (0 < self.repetition_threshold <= 1, "repetition_threshold", "must be in (0, 1]"),
            (0 < self.min_seed_side <= self.max_seed_side, "min_seed_side", "must be in 1..max_seed_side"),
        ])  # fmt: skip


# How models share the GPU: `runtime.offload`, applied by pipeline.offload.place_modules.
OffloadMode = Literal["none", "model", "sequential"]
OFFLOAD_MODES: tuple[str, ...] = typing.get_args(OffloadMode)


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The real preset's models are too slow for a CPU; it says so instead of silently taking hours.
    require_gpu: bool = False
    # Trade speed for GPU memory (see pipeline.offload): "model" keeps each model on the CPU until it
    # runs (one SD component or the LLaVA at a time on the GPU); "sequential" streams every layer's
    # weights in as it runs (least memory, slowest). A 4-bit captioner cannot move and stays resident.
    offload: OffloadMode = "none"
    # Torch's intra-op CPU threads while storypipe works: "auto" keeps torch's default. Tiny and toy models
    # run fastest on 1 (their matrices are too small to split, and extra threads stall on a busy machine),
    # so those presets set it.
    num_threads: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        validate(self, [
            (self.offload in OFFLOAD_MODES, "offload", f"must be one of {', '.join(OFFLOAD_MODES)}"),
            (self.num_threads == "auto" or self.num_threads >= 1, "num_threads", "must be auto or >= 1"),
        ])  # fmt: skip

    def cpu_thread_count(self) -> int | None:
        """The thread count to set, or None for torch's own (see :func:`pipeline.training.cpu_threads`)."""
        return None if self.num_threads == "auto" else self.num_threads


def validate(section: Any, checks: list[tuple[bool, str, str]]) -> None:
    """Raise on the first failed ``(ok, field, message)`` check of a config section's values.

    The error names the field within the section; the loader turns it into the key the user wrote.
    """
    for ok, field_name, message in checks:
        if not ok:
            value = getattr(section, field_name)
            raise InvalidConfigValue(type(section).__name__, field_name, f"{message}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Loading: YAML -> dataclasses, strictly
# --------------------------------------------------------------------------------------------


def load_config(
    cls: type[T],
    path: str | Path,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> T:
    """Read ``path`` into ``cls``, then apply ``--set section.key=value`` overrides (values parsed as YAML),
    then ``values``: typed command options that mirror a config key (``{"story.frames": 5}``).

    Model folders written ``./x`` or ``../x`` in the file are relative to the file; in overrides and
    values they are relative to the working directory (see :func:`resolve_model_path`).
    """
    path = Path(path)
    raw = read_config_file(path)
    _resolve_model_paths(cls, raw, base=path.resolve().parent)
    config = from_dict(cls, raw, source=str(path))
    for override in overrides:
        key, value = _parse_override(override)
        # Re-validate after each override so an error names the override that caused it.
        _set_value(raw, cls, key, value, source=f"--set {override}")
        config = from_dict(cls, raw, source=f"--set {override}")
    for key, value in (values or {}).items():
        if value is not None:
            _set_value(raw, cls, key, value, source=f"option for {key}")
            config = from_dict(cls, raw, source=f"option for {key}")
    return config


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, value_text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. --set data.image_size=256")
    return key, (parse_yaml(value_text, f"--set {_quote(override)}: the value") if value_text.strip() else "")


def read_config_file(path: Path) -> dict:
    """The mapping of sections in YAML file ``path``; anything else is a one-line ``ConfigError``."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give the YAML file itself")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file; give a YAML file")
    with open(path, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file is a short YAML text "
            "(the presets are about 6 KB): is it the right file?"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); a config file is YAML text: "
            "is it the right file?"
        ) from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path} is empty; write the sections to change, or {{}} for every default")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, after checking its nesting depth and its size with aliases expanded
    (so a small file cannot exhaust the stack or the memory); every error is one line naming ``source``."""
    try:
        _check_yaml_size(text, source)
        return yaml.load(text, Loader=YAML_LOADER)  # noqa: S506 (a safe loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(filter(None, (exc.context, exc.problem))) or "unreadable"
        raise ConfigError(f"{source} is not valid YAML: {problem}{where}") from None
    except yaml.reader.ReaderError as exc:  # a control character or a byte that is not text
        character = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(
            f"{source} is not valid YAML: {exc.reason} (#x{character:04x} at character {exc.position})"
        ) from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an impossible date, a 5000-digit number
        raise ConfigError(f"{source} is not valid YAML: a value could not be read ({exc})") from None


def _check_yaml_size(text: str, source: str) -> None:
    """Walk the YAML event stream (which needs neither recursion nor the values themselves) and refuse
    nesting deeper than ``MAX_CONFIG_DEPTH`` or more than ``MAX_CONFIG_VALUES`` values with aliases
    expanded."""
    values = 0
    open_collections: list[tuple[int, str | None]] = []  # (values before it, its anchor)
    anchor_values: dict[str, int] = {}  # anchor -> values in the node it names
    for event in yaml.parse(text, Loader=YAML_LOADER):
        if isinstance(event, yaml.AliasEvent):
            values += anchor_values.get(event.anchor, 1)  # an alias inside its own node counts once
        elif isinstance(event, yaml.ScalarEvent):
            values += 1
            if event.anchor is not None:
                anchor_values[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_collections.append((values, event.anchor))
            values += 1
            if len(open_collections) > MAX_CONFIG_DEPTH:
                raise ConfigError(
                    f"{source} nests mappings or lists more than {MAX_CONFIG_DEPTH} deep; "
                    "a config is a few levels of sections"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            start, anchor = open_collections.pop()
            if anchor is not None:
                anchor_values[anchor] = values - start
        if values > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{source} holds more than {MAX_CONFIG_VALUES} values once its aliases (*name) are "
                "expanded; a config holds a few hundred"
            )


def _set_value(raw: dict, cls: type, key: str, value: Any, source: str) -> None:
    """Put ``value`` at ``section.key`` of the raw tree, after checking the path against the schema."""
    parts = key.split(".")
    node: dict = raw
    node_cls: Any = cls
    for depth, part in enumerate(parts[:-1]):
        # Validate the path against the schema so a typo names the override, not the preset file.
        node_cls = _field_type(node_cls, part, source=source, prefix=".".join(parts[:depth]))
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    field_type = _field_type(node_cls, parts[-1], source=source, prefix=".".join(parts[:-1]))
    if _is_model_path(field_type) and isinstance(value, str):
        value = resolve_model_path(value, base=Path.cwd())
    node[parts[-1]] = value


def _field_type(cls: Any, name: str, source: str, prefix: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{source}: {prefix or '<root>'} is not a section")
    hints = typing.get_type_hints(cls, include_extras=True)
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
        if not isinstance(key, str):
            where = f"in {prefix} " if prefix else ""
            raise ConfigError(
                f"{source}: the key {_quote(key)} {where}is not a name; keys are section and setting names"
            )
        if key not in hints:
            raise ConfigError(_unknown_key_message(cls, key, source, prefix))
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(hints[key], value, source, full)
    try:
        return cls(**kwargs)
    except InvalidConfigValue as exc:
        full = f"{prefix}.{exc.field}" if prefix else exc.field
        raise ConfigError(f"{source}: {full} {exc.message}") from None


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def wrong(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: {key} must be {expected}, got {_quote(value)} ({type(value).__name__})"
        )

    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [arg for arg in args if dataclasses.is_dataclass(arg)]
        if isinstance(value, dict) and len(sections) == 1:  # an optional section: its own errors stand
            return _coerce(sections[0], value, source, key)
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


def _quote(value: Any) -> str:
    """A short repr of a value for an error message, however large or deeply nested the value is."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, QUOTED_VALUE_CHARS, QUOTED_VALUE_CHARS
    return short.repr(value)


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
    "ModelPath",
    "OFFLOAD_MODES",
    "OffloadMode",
    "RuntimeConfig",
    "StoryConfig",
    "ToyDataConfig",
    "RESOLVED_CONFIG_NAME",
    "cache_dir",
    "config_to_dict",
    "from_dict",
    "in_cache",
    "load_config",
    "model_path_fields",
    "parse_yaml",
    "read_config_file",
    "resolve_model_path",
    "save_resolved_config",
    "validate",
]
