"""The wiring: each stage's models built from the root config, on one device.

This is where the stages meet (with :mod:`storypipe.api` and :mod:`storypipe.tasks` on top). The stage
packages are imported inside the functions, so ``storypipe --help`` and config commands start without
loading torch and transformers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import in_cache
from pipeline.errors import ConfigError, require_model_folder
from storypipe.config import StorypipeConfig

if TYPE_CHECKING:
    from eval.baselines import ImageToTextBaseline, TextOnlyBaseline
    from eval.phases import EvalPhase
    from eval.scoring import Measures
    from llava_ft.captioners import Captioners
    from pipeline.config import OffloadMode
    from pipeline.prompts import PromptTemplates
    from storygen_ft.config import GeneratorConfig
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


def process_state() -> Any:
    """accelerate's ``PartialState`` of this process: under ``accelerate launch`` (or torchrun) its index
    among the processes (on one machine or several) and its own GPU; one process otherwise. Several CPU
    processes talk over gloo."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_device(cfg: StorypipeConfig, state: Any) -> str:
    """This process's device: its own GPU (``state.device``) when the config runs on CUDA, else
    ``runtime.device``."""
    device = resolve_device(cfg)
    return str(state.device) if device == "cuda" else device


def captioner_offload(cfg: StorypipeConfig) -> OffloadMode:
    """``runtime.offload`` for the captioners: a 4-bit LLaVA (``captioner.load_in_4bit``) cannot be moved
    by offload hooks, so it stays resident and ``runtime.offload`` applies to the generator only."""
    return "none" if cfg.captioner.load_in_4bit else cfg.runtime.offload


def load_captioners(cfg: StorypipeConfig, device: str | None = None) -> Captioners:
    """Both captioners on one base, on ``device`` (default: from ``runtime``), offloaded as
    :func:`captioner_offload` says."""
    from llava_ft.captioners import Captioners

    return Captioners.from_config(
        cfg.captioner, device=device or resolve_device(cfg), offload=captioner_offload(cfg)
    )


def load_frame_generator(cfg: StorypipeConfig, device: str | None = None) -> FrameGenerator:
    """The frame generator on ``device`` (default: from ``runtime``), offloaded as ``runtime.offload`` says."""
    from storygen_ft.generator import FrameGenerator

    return FrameGenerator.from_config(
        cfg.generator, device=device or resolve_device(cfg), offload=cfg.runtime.offload
    )


def memory_generator_config(cfg: StorypipeConfig) -> GeneratorConfig | None:
    """The generator section's settings with ``eval.memory_generator_model`` and ``context=memory``; None
    when that model is unset."""
    if cfg.eval.memory_generator_model is None:
        return None
    return dataclasses.replace(cfg.generator, base_model=cfg.eval.memory_generator_model, context="memory")


def load_memory_frame_generator(cfg: StorypipeConfig, device: str | None = None) -> FrameGenerator | None:
    """The memory-attention frame generator of :func:`memory_generator_config` (None when unset)."""
    from storygen_ft.generator import FrameGenerator

    memory = memory_generator_config(cfg)
    if memory is None:
        return None
    require_model_folder(
        "eval.memory_generator_model", memory.base_model, EVAL_MODEL_ADVICE["memory_generator_model"]
    )
    return FrameGenerator.from_config(
        memory, device=device or resolve_device(cfg), offload=cfg.runtime.offload
    )


def build_missing_tiny_bases(cfg: StorypipeConfig) -> None:
    """The tiny preset's captioner and generator bases (and the memory generator's), built into storypipe's
    cache where they do not exist yet, as their first load would build them: so their folders, and the
    eval cache keys made from them, exist before anything loads. Any other folder is left alone."""
    from llava_ft.model import resolve_base_model as resolve_captioner_base
    from storygen_ft.model import resolve_base_model as resolve_generator_base

    resolve_captioner_base(cfg.captioner)
    resolve_generator_base(cfg.generator)
    memory = memory_generator_config(cfg)
    if memory is not None:
        resolve_generator_base(memory)


def eval_systems(cfg: StorypipeConfig) -> frozenset[str]:
    """The systems under test `storypipe eval` runs with ``cfg`` (:class:`eval.runner.EvalModels` fields):
    ours always, the memory generator and each baseline where the eval section names its model."""
    ecfg = cfg.eval
    optional = {
        "memory_illustrator": ecfg.memory_generator_model,
        "caption_baseline": ecfg.caption_baseline_model,
        "text_baseline": ecfg.text_baseline_model,
    }
    return frozenset(
        {"captioners", "illustrator", "tell_story"} | {name for name, model in optional.items() if model}
    )


def eval_phases(cfg: StorypipeConfig) -> tuple[EvalPhase, ...]:
    """The phases `storypipe eval` goes through with ``cfg``, in order, each with the model groups it holds
    at once (:mod:`eval.phases`): eval's peak memory is its largest phase's. A rerun skips the phases its
    cache holds every row of."""
    from eval.phases import eval_phases as phases

    return phases(eval_systems(cfg), cfg.eval.rows)


# Config fields that never change what a loaded system outputs in `storypipe eval`: training, building a
# tiny model (its folder's fingerprint counts instead), `storypipe edit`, and the story length and seed
# (the eval tells each story at its own length, with eval.seed).
NOT_IN_EVAL_OUTPUTS = {
    "captioner": ("train", "pretrain", "lora", "tiny", "gradient_checkpointing"),
    "generator": ("train", "pretrain", "tiny", "edit_strength"),
    "story": ("frames", "seed"),
}


def eval_identities(cfg: StorypipeConfig, prompts: PromptTemplates, device: str) -> dict[str, Any]:
    """What determines each system's outputs in `storypipe eval`, by :class:`eval.runner.EvalModels` field
    (None where it is not configured): the settings it runs with, each model folder's fingerprint, the
    captioners' prompt templates and the device type (CUDA decodes in bf16). Every cached output's key
    covers it (:mod:`eval.cache`). Call it after the models load: a tiny model is built on first load."""
    import torch

    from eval.cache import model_fingerprint, section_identity

    ecfg, device_type = cfg.eval, torch.device(device).type

    def settings(section: Any, name: str) -> dict[str, Any]:
        return section_identity(section, NOT_IN_EVAL_OUTPUTS[name])

    def system(**parts: Any) -> dict[str, Any] | None:
        """One system's identity; None when a part is missing (that system is not configured)."""
        return None if None in parts.values() else {**parts, "device": device_type}

    captioner = {**settings(cfg.captioner, "captioner"), "prompts": dataclasses.asdict(prompts)}
    generator = settings(cfg.generator, "generator")
    memory = memory_generator_config(cfg)
    return {
        # The text rows decode at eval.text_temperature; the told stories keep captioner.temperature.
        "captioners": system(captioner={**captioner, "temperature": ecfg.text_temperature}),
        "illustrator": system(generator=generator),
        "memory_illustrator": system(generator=None if memory is None else settings(memory, "generator")),
        "tell_story": system(captioner=captioner, generator=generator, story=settings(cfg.story, "story")),
        "caption_baseline": system(model=model_fingerprint(ecfg.caption_baseline_model)),
        "text_baseline": system(model=model_fingerprint(ecfg.text_baseline_model)),
    }


# What makes each measuring model of the eval section, for the error when its folder is missing.
EVAL_MODEL_ADVICE = {
    "sentence_model": "Name a sentence-transformers model (a hub id or a folder), or python-package:NAME.",
    "clip_model": "`storypipe train-clip` trains a toy CLIP; real runs name a hub id.",
    "classifier_model": "`storypipe train-classifier` trains one on labelled frames; or set it to null.",
    "detector_model": "Name a transformers object detector (a hub id), or set it to null to skip object counts.",
    "caption_baseline_model": "`make toy` trains the toy models; or set it to null to skip the baseline.",
    "text_baseline_model": "`storypipe train-text-baseline` trains a toy one; or set it to null to skip it.",
    "memory_generator_model": "`storypipe finetune-storygen --set generator.context=memory` trains one; "
    "or set it to null.",
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


def load_caption_baseline(cfg: StorypipeConfig, device: str) -> ImageToTextBaseline | None:
    """The papers' image-to-text baseline (their BLIP row); None where the eval section skips it."""
    from eval.baselines import ImageToTextBaseline

    ecfg = cfg.eval
    _require_eval_models(ecfg, ("caption_baseline_model",))
    return (
        ImageToTextBaseline.load(ecfg.caption_baseline_model, device) if ecfg.caption_baseline_model else None
    )


def load_text_baseline(cfg: StorypipeConfig, device: str) -> TextOnlyBaseline | None:
    """The papers' text-only LM baseline (their MPT row); None where the eval section skips it."""
    from eval.baselines import TextOnlyBaseline

    ecfg = cfg.eval
    _require_eval_models(ecfg, ("text_baseline_model",))
    return TextOnlyBaseline.load(ecfg.text_baseline_model, device) if ecfg.text_baseline_model else None


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
