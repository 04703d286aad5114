"""The wiring: each stage's models built from the root config, on one device.

This is where the stages meet (with :mod:`storypipe.api` and :mod:`storypipe.tasks` on top). The stage
packages are imported inside the functions, so ``storypipe --help`` and config commands start without
loading torch and transformers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import in_cache
from pipeline.errors import ConfigError, require_model_folder
from storypipe.config import StorypipeConfig

if TYPE_CHECKING:
    from eval.baselines import ImageToTextBaseline, TextOnlyBaseline
    from eval.scoring import Measures
    from llava_ft.captioners import Captioners
    from storygen_ft.generator import FrameGenerator


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


def load_frame_generator(cfg: StorypipeConfig, device: str | None = None) -> FrameGenerator:
    from storygen_ft.generator import FrameGenerator

    return FrameGenerator.from_config(cfg.generator, device=device or resolve_device(cfg))


def load_memory_frame_generator(cfg: StorypipeConfig, device: str | None = None) -> FrameGenerator | None:
    """The memory-attention frame generator of ``eval.memory_generator_model`` (None when unset): the
    generator section's settings, with that model and ``context=memory``."""
    from storygen_ft.generator import FrameGenerator

    if cfg.eval.memory_generator_model is None:
        return None
    require_model_folder(
        "eval.memory_generator_model",
        cfg.eval.memory_generator_model,
        "`storypipe finetune-storygen --set generator.context=memory` trains one; or set it to null.",
    )
    memory = dataclasses.replace(cfg.generator, base_model=cfg.eval.memory_generator_model, context="memory")
    return FrameGenerator.from_config(memory, device=device or resolve_device(cfg))


# What makes each measuring model of the eval section, for the error when its folder is missing.
EVAL_MODEL_ADVICE = {
    "clip_model": "`storypipe train-clip` trains a toy CLIP; real runs name a hub id.",
    "classifier_model": "`storypipe train-classifier` trains one on labelled frames; or set it to null.",
    "detector_model": "Name a transformers object detector (a hub id), or set it to null to skip object counts.",
    "caption_baseline_model": "`make toy` trains the toy models; or set it to null to skip the baseline.",
    "text_baseline_model": "`storypipe train-text-baseline` trains a toy one; or set it to null to skip it.",
}


def load_measures(cfg: StorypipeConfig, device: str) -> Measures:
    """The models the metrics need (sentence embeddings, CLIP, and the optional detector and classifier)."""
    from eval.classifier import FrameClassifier
    from eval.detector import ObjectCounter
    from eval.image_metrics import ClipSimilarity
    from eval.scoring import Measures
    from eval.text_metrics import SentenceSimilarity, resolve_model_reference

    ecfg = cfg.eval
    _require_eval_models(ecfg, ("clip_model", "classifier_model", "detector_model"))
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


def load_baselines(
    cfg: StorypipeConfig, device: str
) -> tuple[ImageToTextBaseline | None, TextOnlyBaseline | None]:
    """The papers' two text baselines (image-to-text, text-only LM); None where the eval section skips one."""
    from eval.baselines import ImageToTextBaseline, TextOnlyBaseline

    ecfg = cfg.eval
    _require_eval_models(ecfg, ("caption_baseline_model", "text_baseline_model"))
    caption = (
        ImageToTextBaseline.load(ecfg.caption_baseline_model, device) if ecfg.caption_baseline_model else None
    )
    text = TextOnlyBaseline.load(ecfg.text_baseline_model, device) if ecfg.text_baseline_model else None
    return caption, text


def _require_eval_models(ecfg, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(ecfg, key):
            require_model_folder(f"eval.{key}", getattr(ecfg, key), EVAL_MODEL_ADVICE[key])


def build_missing_tiny_eval_models(cfg: StorypipeConfig) -> None:
    """The tiny preset's measuring models and baselines, built offline on first use; only folders in
    storypipe's cache are ever built (any other missing folder is an error when it loads)."""
    from toy.builders import build_tiny_causal_lm, build_tiny_clip, build_tiny_detector

    ecfg = cfg.eval
    for folder, build in (
        (ecfg.clip_model, build_tiny_clip),
        (ecfg.detector_model, build_tiny_detector),
        (ecfg.text_baseline_model, build_tiny_causal_lm),
    ):
        if folder and in_cache(folder) and not Path(folder, "config.json").is_file():
            build(folder)
