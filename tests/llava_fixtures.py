"""Tiny LLaVA test data: two frames, each with a story sample and a description sample whose answers differ."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from llava_ft.config import CaptionerConfig, CaptionerTrainConfig, LoraSettings
from llava_ft.prepare import conversation
from pipeline.prompts import PromptTemplates

CAPTIONS = ("Rosa ran very fast.", "Bruno waved hello.")
NEXT_CAPTIONS = ("Then she jumped over the rock.", "Later, he fell asleep.")
DESCRIPTIONS = ("A red circle jumps over a rock on a snowy field.", "A blue square sleeps on a sandy beach.")
COLOURS = ((220, 30, 30), (30, 70, 220))


def write_llava_samples(folder: Path) -> Path:
    """story.json, description.json and images/ in prepare-llava's format."""
    (folder / "images").mkdir(parents=True)
    prompts = PromptTemplates.load()
    story, description = [], []
    for k, (caption, upcoming, literal, colour) in enumerate(
        zip(CAPTIONS, NEXT_CAPTIONS, DESCRIPTIONS, COLOURS, strict=True)
    ):
        Image.new("RGB", (40, 40), colour).save(folder / "images" / f"{k}.jpg")
        story.append(conversation(f"s_{k}", f"{k}.jpg", prompts.story_next_question(caption), upcoming))
        question = prompts.description_question(previous_caption=caption, current_caption=upcoming)
        description.append(conversation(f"s_{k}", f"{k}.jpg", question, literal))
    (folder / "story.json").write_text(json.dumps(story))
    (folder / "description.json").write_text(json.dumps(description))
    return folder


def frame_images(folder: Path) -> list[Image.Image]:
    return [Image.open(folder / "images" / f"{k}.jpg").convert("RGB") for k in range(len(CAPTIONS))]


def tiny_captioner_config(base: Path, lora_dropout: float = 0.0, **train_overrides) -> CaptionerConfig:
    """A CPU config for the tiny LLaVA: greedy decoding, a LoRA big enough to overfit two samples."""
    train = {"max_steps": 80, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
             "warmup_steps": 0, "checkpoint_every": 1000, "eval_every": 1000, "eval_fraction": 0.0}  # fmt: skip
    train.update(train_overrides)
    return CaptionerConfig(
        base_model=str(base),
        load_in_4bit=False,
        gradient_checkpointing=False,
        temperature=0.0,
        max_new_tokens=20,
        lora=LoraSettings(r=8, alpha=16, dropout=lora_dropout),
        train=CaptionerTrainConfig(**train),
    )
