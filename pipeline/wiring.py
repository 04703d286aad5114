"""The one place where the stages meet.

``llava_ft``, ``storygen_ft`` and ``eval`` import ``pipeline`` and never each other; only this module
(and the CLI through it) imports all of them. Here the root config is composed from the section each
stage owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from eval.config import EvalConfig
from llava_ft.config import CaptionerConfig
from pipeline.config import DEFAULT_PRESET, DataConfig, ToyDataConfig, load_config, preset_path
from pipeline.errors import ConfigError
from storygen_ft.config import GeneratorConfig

if TYPE_CHECKING:
    from llava_ft.captioners import Captioners
    from storygen_ft.generator import FrameGenerator


@dataclass
class StorypipeConfig:
    """The whole config tree; ``configs/*.yaml`` mirror it section by section."""

    data: DataConfig = field(default_factory=DataConfig)
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def resolve_config(
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> StorypipeConfig:
    """``--config FILE`` or ``--preset NAME`` (default: the ``vist`` preset), then ``--set`` overrides in order."""
    if config_file is not None and preset is not None:
        raise ConfigError("give either --config FILE or --preset NAME, not both")
    path = Path(config_file) if config_file is not None else preset_path(preset or DEFAULT_PRESET)
    return load_config(StorypipeConfig, path, overrides)


# --------------------------------------------------------------------------------------------
# Stage entry points used by the CLI (imported lazily: torch and transformers load only when needed)
# --------------------------------------------------------------------------------------------


def finetune_llava(
    cfg: StorypipeConfig, task: str, data_file: Path, images_dir: Path, out_dir: Path, resume: bool = False
) -> Path:
    """Train one captioner adapter; the whole resolved config is recorded in the run."""
    from llava_ft.train import FinetuneRun, train

    return train(
        FinetuneRun(cfg.captioner, task, data_file, images_dir, out_dir, resume=resume, resolved_config=cfg)
    )


def load_captioners(cfg: StorypipeConfig, device: str | None = None) -> Captioners:
    """Both captioners on one base, on ``device`` (default: CUDA when available)."""
    import torch

    from llava_ft.captioners import Captioners

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Captioners.from_config(cfg.captioner, device=device)


def finetune_storygen(
    cfg: StorypipeConfig, data_dir: Path, out_dir: Path, split: str = "train", resume: bool = False
) -> Path:
    """Train the frame generator's context layers on a VIST-layout folder."""
    from storygen_ft.train import StoryGenRun, train

    return train(
        StoryGenRun(cfg.generator, data_dir, out_dir, split=split, resume=resume, resolved_config=cfg)
    )


def load_frame_generator(cfg: StorypipeConfig, device: str | None = None) -> FrameGenerator:
    import torch

    from storygen_ft.generator import FrameGenerator

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return FrameGenerator.from_config(cfg.generator, device=device)
