"""The one place where the stages meet.

``llava_ft``, ``storygen_ft`` and ``eval`` import ``pipeline`` and never each other; only this module
(and the CLI through it) imports all of them. Here the root config is composed from the section each
stage owns.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from storypipe.config import StorypipeConfig

if TYPE_CHECKING:
    from llava_ft.captioners import Captioners
    from pipeline.orchestrator import Progress, StoryTeller
    from storygen_ft.generator import FrameGenerator


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


def pretrain_llava(
    cfg: StorypipeConfig, data_file: Path, images_dir: Path, out_dir: Path, resume: bool = False
) -> Path:
    """Pretrain a tiny captioner base from scratch (every parameter) on caption.json: the toy models."""
    from llava_ft.config import PRETRAIN_TASK
    from llava_ft.train import FinetuneRun, train

    run = FinetuneRun(
        cfg.captioner, PRETRAIN_TASK, data_file, images_dir, out_dir,
        resume=resume, resolved_config=cfg, full_parameters=True,
    )  # fmt: skip
    return train(run)


def pretrain_diffusion(
    cfg: StorypipeConfig, data_dir: Path, out_dir: Path, split: str = "train", resume: bool = False
) -> Path:
    """Build a diffusion base from scratch (VAE, then a text-to-image UNet) on a VIST-layout folder."""
    from storygen_ft.pretrain import PretrainRun, pretrain

    return pretrain(
        PretrainRun(cfg.generator, data_dir, out_dir, split=split, resume=resume, resolved_config=cfg)
    )


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


def load_memory_frame_generator(cfg: StorypipeConfig, device: str | None = None) -> FrameGenerator | None:
    """The memory-attention frame generator of ``eval.memory_generator_model`` (None when unset): the
    generator section's settings, with that model and ``context=memory``."""
    from storygen_ft.generator import FrameGenerator

    if cfg.eval.memory_generator_model is None:
        return None
    memory = dataclasses.replace(cfg.generator, base_model=cfg.eval.memory_generator_model, context="memory")
    return FrameGenerator.from_config(memory, device=device or resolve_device(cfg))


def build_story_teller(cfg: StorypipeConfig, progress: Progress | None = None) -> StoryTeller:
    """The story loop with the configured captioners and frame generator on one device."""
    from pipeline.orchestrator import StoryTeller

    device = resolve_device(cfg)
    captioners, generator = load_captioners(cfg, device), load_frame_generator(cfg, device)
    return StoryTeller(
        captioners, generator, cfg.story, context_frames=cfg.generator.max_references, progress=progress
    )


def run_eval(cfg: StorypipeConfig, data_dir: Path, out_dir: Path, progress=None) -> dict | None:
    """`storypipe eval`: the systems under test from the captioner and generator sections, the measuring
    models from the eval section. Under `accelerate launch` each process takes every n-th story."""
    import torch
    from accelerate import PartialState
    from PIL import Image

    from eval.baselines import ImageToTextBaseline, TextOnlyBaseline
    from eval.runner import EvalModels, StoryFrames, evaluate, select_stories
    from pipeline.config import save_resolved_config
    from pipeline.orchestrator import StoryTeller
    from pipeline.story_folder import load_frame_image

    state = PartialState()
    ecfg = cfg.eval
    # 1. Inputs first: the stories (a clear error for an empty split) and the device.
    stories = select_stories(Path(data_dir), ecfg, cfg.data.story_length)
    device = str(state.device) if torch.cuda.is_available() else resolve_device(cfg)
    if ecfg.build_tiny_models:
        _build_missing_tiny_eval_models(cfg)

    # 2. The measuring models (main process), loaded before any generation so a bad path fails fast.
    measures = _load_measures(cfg, device) if state.is_main_process else None

    # 3. The systems under test.
    captioners, generator = load_captioners(cfg, device), load_frame_generator(cfg, device)
    memory_generator = load_memory_frame_generator(cfg, device)

    def tell_story(
        folder: Path, seed_image: Image.Image, caption: str, frames: int, seed: int
    ) -> StoryFrames:
        story_cfg = dataclasses.replace(cfg.story, frames=frames, seed=seed)
        teller = StoryTeller(captioners, generator, story_cfg, context_frames=cfg.generator.max_references)
        folder.mkdir(parents=True, exist_ok=True)
        story = teller.tell(folder, seed_image, caption)
        return StoryFrames(
            captions=[f.story_caption for f in story.frames],
            descriptions=[f.description or "" for f in story.frames],
            images=[load_frame_image(folder, f.image) for f in story.frames],
        )

    models = EvalModels(
        captioners=captioners.with_temperature(ecfg.text_temperature),
        illustrator=generator,
        memory_illustrator=memory_generator,
        tell_story=tell_story,
        caption_baseline=ImageToTextBaseline.load(ecfg.caption_baseline_model, device)
        if ecfg.caption_baseline_model
        else None,
        text_baseline=TextOnlyBaseline.load(ecfg.text_baseline_model, device)
        if ecfg.text_baseline_model
        else None,
    )
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, out_dir)
    return evaluate(
        stories, data_dir, out_dir, ecfg, models, measures,
        process_index=state.process_index,
        num_processes=state.num_processes,
        wait_for_everyone=state.wait_for_everyone,
        progress=progress,
    )  # fmt: skip


def train_classifier(cfg: StorypipeConfig, data_dir: Path, out_dir: Path, progress=None) -> dict:
    """The character/background classifier for Make-A-Story's accuracy and F1."""
    from toy.classifier import train_classifier as train

    return train(data_dir, out_dir, cfg.classifier, progress=progress)


def train_clip(cfg: StorypipeConfig, data_dir: Path, out_dir: Path, progress=None) -> dict:
    """The tiny CLIP, trained on (frame, description) pairs; the whole resolved config is saved with it."""
    from toy.clip import train_clip as train

    return train(data_dir, out_dir, cfg.clip_training, progress=progress, resolved_config=cfg)


def train_text_baseline(cfg: StorypipeConfig, data_dir: Path, out_dir: Path, progress=None) -> dict:
    """The tiny text-only LM baseline, trained on story captions; the whole resolved config is saved with it."""
    from toy.text_lm import train_text_baseline as train

    return train(data_dir, out_dir, cfg.text_baseline_training, progress=progress, resolved_config=cfg)


def _load_measures(cfg: StorypipeConfig, device: str):
    from eval.classifier import FrameClassifier
    from eval.detector import ObjectCounter
    from eval.image_metrics import ClipSimilarity
    from eval.scoring import Measures
    from eval.text_metrics import SentenceSimilarity, resolve_model_reference

    ecfg = cfg.eval
    return Measures(
        sentence=SentenceSimilarity.load(resolve_model_reference(ecfg.sentence_model), device=device),
        clip=ClipSimilarity.load(ecfg.clip_model, device=device),
        detector=ObjectCounter.load(ecfg.detector_model, ecfg.detector_threshold, device=device)
        if ecfg.detector_model
        else None,
        classifier=FrameClassifier.from_pretrained(ecfg.classifier_model) if ecfg.classifier_model else None,
        kl_epsilon=ecfg.kl_epsilon,
        fid_resize=ecfg.fid_resize,
    )


def _build_missing_tiny_eval_models(cfg: StorypipeConfig) -> None:
    """The tiny preset's measuring models and baselines, built offline into folders that do not exist yet."""
    from toy.builders import build_tiny_causal_lm, build_tiny_clip, build_tiny_detector

    ecfg = cfg.eval
    if not Path(ecfg.clip_model, "config.json").is_file():
        build_tiny_clip(ecfg.clip_model)
    if ecfg.detector_model and not Path(ecfg.detector_model, "config.json").is_file():
        build_tiny_detector(ecfg.detector_model)
    if ecfg.text_baseline_model and not Path(ecfg.text_baseline_model, "config.json").is_file():
        build_tiny_causal_lm(ecfg.text_baseline_model)
