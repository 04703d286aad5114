"""The Python API's other half: data, training and evaluation, one function per CLI command.

Each function takes the resolved config first, checks its inputs, runs one stage, and records the whole
config in what it writes. ``progress`` is an optional :class:`pipeline.progress.ProgressReporter` (the
CLI passes one; training scripts report their own progress). Stages are imported inside the functions,
so a command loads only what it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import save_resolved_config
from pipeline.errors import InputError
from pipeline.progress import ProgressReporter
from storypipe import preflight, wiring
from storypipe.api import StoryPipeline
from storypipe.config import StorypipeConfig

if TYPE_CHECKING:
    from llava_ft.prepare import PrepareReport

STORYSV_DATASETS = ("flintstones", "pororo")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def toy_data(cfg: StorypipeConfig, out: Path, progress: ProgressReporter | None = None) -> dict[str, int]:
    """ShapeStories, our procedural story world, in VIST's layout; returns stories per split."""
    from pipeline.data.shapestories import generate_shapestories

    with progress or ProgressReporter(enabled=False) as reporter:
        stories = reporter.task("ShapeStories", total=cfg.toy.stories)
        counts = generate_shapestories(out, cfg.toy, progress=stories.advance)
    save_resolved_config(cfg, out)
    return counts


def prepare_llava(
    cfg: StorypipeConfig,
    vist_dir: Path,
    out: Path,
    split: str = "train",
    limit: int | None = None,
    progress: ProgressReporter | None = None,
) -> PrepareReport:
    """The captioners' LLaVA training data (story_next.json, description.json, caption.json, images/)."""
    from llava_ft.prepare import prepare_llava as prepare

    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    with progress or ProgressReporter(enabled=False) as reporter:
        stories = reporter.task("stories")
        report = prepare(
            vist_dir,
            split,
            out,
            cfg.data,
            limit=limit,
            progress=lambda done, total: stories.update(done, total),
        )
    save_resolved_config(cfg, out)
    return report


def convert_storysv(
    cfg: StorypipeConfig,
    dataset: Literal["flintstones", "pororo"],
    src: Path,
    out: Path,
    referential: bool = False,
    progress: ProgressReporter | None = None,
) -> dict[str, int]:
    """FlintstonesSV or PororoSV in VIST's layout, with character (and background) labels."""
    from pipeline.data.storysv import convert_storysv as convert

    if dataset not in STORYSV_DATASETS:
        raise InputError(f"dataset must be {' or '.join(STORYSV_DATASETS)}, got {dataset!r}")
    with progress or ProgressReporter(enabled=False) as reporter:
        stories = reporter.task(dataset)
        counts = convert(dataset, src, out, referential=referential, progress=stories.advance)
    save_resolved_config(cfg, out)
    return counts


# --------------------------------------------------------------------------------------------
# The captioners
# --------------------------------------------------------------------------------------------


def finetune_llava(
    cfg: StorypipeConfig, task: str, data_file: Path, images_dir: Path, out: Path, resume: bool = False
) -> Path:
    """One captioner adapter (``story`` or ``description``), LoRA on the LLaVA base; a plain PEFT folder."""
    from llava_ft.train import FinetuneRun, train

    preflight.require(cfg, "finetune-llava")
    return train(
        FinetuneRun(cfg.captioner, task, data_file, images_dir, out, resume=resume, resolved_config=cfg)
    )


def pretrain_llava(
    cfg: StorypipeConfig, data_file: Path, images_dir: Path, out: Path, resume: bool = False
) -> Path:
    """A tiny captioner base from scratch, every parameter, on caption.json (the toy models)."""
    from llava_ft.config import PRETRAIN_TASK
    from llava_ft.train import FinetuneRun, train

    run = FinetuneRun(
        cfg.captioner, PRETRAIN_TASK, data_file, images_dir, out,
        resume=resume, resolved_config=cfg, full_parameters=True,
    )  # fmt: skip
    return train(run)


# --------------------------------------------------------------------------------------------
# The frame generator
# --------------------------------------------------------------------------------------------


def pretrain_diffusion(
    cfg: StorypipeConfig, data_dir: Path, out: Path, split: str = "train", resume: bool = False
) -> Path:
    """A diffusion base from scratch (a VAE, then a text-to-image UNet) on a VIST-layout folder."""
    from storygen_ft.pretrain import PretrainRun, pretrain

    preflight.require(cfg, "pretrain-diffusion")
    return pretrain(
        PretrainRun(cfg.generator, data_dir, out, split=split, resume=resume, resolved_config=cfg)
    )


def finetune_storygen(
    cfg: StorypipeConfig, data_dir: Path, out: Path, split: str = "train", resume: bool = False
) -> Path:
    """The frame generator's context layers on a VIST-layout folder; loads with one from_pretrained call."""
    from storygen_ft.train import StoryGenRun, train

    preflight.require(cfg, "finetune-storygen")
    return train(StoryGenRun(cfg.generator, data_dir, out, split=split, resume=resume, resolved_config=cfg))


def import_storygen(cfg: StorypipeConfig, checkpoint: str, out: Path, base: str | None = None) -> Path:
    """StoryGen's released UNet (a folder or hub id) as a generator folder in ``storygen_exact`` mode; the
    VAE, text encoder, tokenizer and scheduler come from ``base`` (default: ``generator.base_model``)."""
    from storygen_ft.import_storygen import import_storygen as convert

    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} is not empty; name a new folder")
    return convert(checkpoint, out, base or cfg.generator.base_model)


# --------------------------------------------------------------------------------------------
# Evaluation and its models
# --------------------------------------------------------------------------------------------


def evaluate(
    cfg: StorypipeConfig, data_dir: Path, out: Path, progress: ProgressReporter | None = None
) -> dict[str, Any] | None:
    """Both papers' metric tables with their baselines, into ``out`` (results.json, results.md, plots).

    The systems under test come from the captioner and generator sections, the measuring models from the
    eval section. They load phase by phase (:mod:`eval.phases`), each phase's freed before the next loads,
    so the real preset fits one 24 GB GPU; a phase whose rows are all cached loads nothing. Under
    ``accelerate launch`` each process takes every n-th story; the main process scores and returns the
    results (the others return None).
    """
    from PIL import Image

    from eval.runner import EvalModels, PhasedModels, StoryFrames, select_stories
    from eval.runner import evaluate_in_phases as run
    from pipeline.prompts import PromptTemplates
    from pipeline.training import cpu_threads

    state = wiring.process_state()
    ecfg = cfg.eval
    # 1. Inputs first: the stories (a clear error for an empty split) and the device.
    stories = select_stories(Path(data_dir), ecfg, cfg.data.story_length)
    device = wiring.process_device(cfg, state)
    preflight.require(cfg, "eval")  # every missing model at once, before any loads
    if ecfg.build_tiny_models:
        wiring.build_missing_tiny_eval_models(cfg)
    wiring.build_missing_tiny_bases(cfg)  # the tiny models' folders fingerprint the cache keys
    # The captioners load with the shipped prompt templates (Captioners.from_config).
    identities = wiring.eval_identities(cfg, PromptTemplates.load(), device)

    # 2. Each phase's loader: the systems under test it runs, loaded afresh (the runner frees them).
    def captioners() -> EvalModels:  # the text rows decode at eval.text_temperature
        return EvalModels(
            captioners=wiring.load_captioners(cfg, device).with_temperature(ecfg.text_temperature)
        )

    def told_stories() -> EvalModels:
        pipe = StoryPipeline(
            cfg, wiring.load_captioners(cfg, device), wiring.load_frame_generator(cfg, device)
        )

        def tell_story(
            folder: Path, seed_image: Image.Image, caption: str, frames: int, seed: int
        ) -> StoryFrames:
            story = pipe.tell(seed_image, caption, frames=frames, seed=seed)
            story.save(folder)  # a story folder a person can open
            return StoryFrames(
                captions=[f.story_caption for f in story.frames],
                descriptions=[f.description or "" for f in story.frames],
                images=[f.image for f in story.frames],
            )

        return EvalModels(tell_story=tell_story)

    models = PhasedModels(
        systems=wiring.eval_systems(cfg),
        loaders={
            "captioners": captioners,
            "told_stories": told_stories,
            "generator": lambda: EvalModels(illustrator=wiring.load_frame_generator(cfg, device)),
            "memory_generator": lambda: EvalModels(
                memory_illustrator=wiring.load_memory_frame_generator(cfg, device)
            ),
            "caption_baseline": lambda: EvalModels(
                caption_baseline=wiring.load_caption_baseline(cfg, device)
            ),
            "text_baseline": lambda: EvalModels(text_baseline=wiring.load_text_baseline(cfg, device)),
        },
        load_measures=lambda: wiring.load_measures(cfg, device),
    )
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, out)
    with progress or ProgressReporter(enabled=False) as reporter, cpu_threads(cfg.runtime.cpu_thread_count()):
        done = reporter.task("eval steps (phase, story)", total=None) if state.is_main_process else None
        return run(
            stories, data_dir, out, ecfg, models,
            process_index=state.process_index,
            num_processes=state.num_processes,
            wait_for_everyone=state.wait_for_everyone,
            progress=(lambda count, total: done.update(count, total)) if done is not None else None,
            identities=identities,
        )  # fmt: skip


def train_classifier(cfg: StorypipeConfig, data_dir: Path, out: Path, resume: bool = False) -> dict:
    """The character/background classifier for Make-A-Story's accuracy and F1."""
    from toy.classifier import train_classifier as train

    return train(data_dir, out, cfg.classifier, resume=resume)


def train_clip(cfg: StorypipeConfig, data_dir: Path, out: Path, resume: bool = False) -> dict:
    """The tiny CLIP, contrastively on (frame, description) pairs: the toy runs' CLIP metrics and text encoder."""
    from toy.clip import train_clip as train

    return train(data_dir, out, cfg.clip_training, resolved_config=cfg, resume=resume)


def train_text_baseline(cfg: StorypipeConfig, data_dir: Path, out: Path, resume: bool = False) -> dict:
    """The tiny text-only LM baseline on story captions (the toy analogue of the paper's MPT row)."""
    from toy.text_lm import train_text_baseline as train

    return train(data_dir, out, cfg.text_baseline_training, resolved_config=cfg, resume=resume)
