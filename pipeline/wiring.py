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
from pipeline.config import (
    DEFAULT_PRESET,
    DataConfig,
    RuntimeConfig,
    StoryConfig,
    ToyDataConfig,
    load_config,
    preset_path,
)
from pipeline.errors import ConfigError
from storygen_ft.config import GeneratorConfig

if TYPE_CHECKING:
    from llava_ft.captioners import Captioners
    from pipeline.orchestrator import Progress, StoryTeller
    from storygen_ft.generator import FrameGenerator


@dataclass
class StorypipeConfig:
    """The whole config tree; ``configs/*.yaml`` mirror it section by section."""

    data: DataConfig = field(default_factory=DataConfig)
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    story: StoryConfig = field(default_factory=StoryConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


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


def resolve_device(cfg: StorypipeConfig) -> str:
    """``runtime.device``, with ``auto`` meaning CUDA when there is one; refuses a CPU when the preset needs a GPU."""
    import torch

    has_cuda = torch.cuda.is_available()
    if cfg.runtime.device == "cuda" and not has_cuda:
        raise ConfigError(
            "runtime.device is cuda, but no CUDA GPU is available; use --set runtime.device=cpu"
        )
    device = cfg.runtime.device if cfg.runtime.device != "auto" else ("cuda" if has_cuda else "cpu")
    if cfg.runtime.require_gpu and device != "cuda":
        raise ConfigError(
            "this preset runs the real models (a 7B LLaVA and SD 1.5) and expects a GPU, but none is available. "
            "Run on the CPU anyway (slow: minutes per frame) with --set runtime.require_gpu=false, "
            "or try the tiny models offline with --preset tiny."
        )
    return device


def load_captioners(cfg: StorypipeConfig, device: str | None = None) -> Captioners:
    """Both captioners on one base, on ``device`` (default: from ``runtime``)."""
    from llava_ft.captioners import Captioners

    return Captioners.from_config(cfg.captioner, device=device or resolve_device(cfg))


def finetune_storygen(
    cfg: StorypipeConfig, data_dir: Path, out_dir: Path, split: str = "train", resume: bool = False
) -> Path:
    """Train the frame generator's context layers on a VIST-layout folder."""
    from storygen_ft.train import StoryGenRun, train

    return train(
        StoryGenRun(cfg.generator, data_dir, out_dir, split=split, resume=resume, resolved_config=cfg)
    )


def load_frame_generator(cfg: StorypipeConfig, device: str | None = None) -> FrameGenerator:
    from storygen_ft.generator import FrameGenerator

    return FrameGenerator.from_config(cfg.generator, device=device or resolve_device(cfg))


def build_story_teller(cfg: StorypipeConfig, progress: Progress | None = None) -> StoryTeller:
    """The story loop with the configured captioners and frame generator on one device."""
    from pipeline.orchestrator import StoryTeller

    device = resolve_device(cfg)
    captioners, generator = load_captioners(cfg, device), load_frame_generator(cfg, device)
    return StoryTeller(
        captioners, generator, cfg.story, context_frames=cfg.generator.max_references, progress=progress
    )
