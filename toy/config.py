"""Config sections of the toy-only models: ``classifier``, ``clip_training`` and ``text_baseline_training``."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import validate


@dataclass
class ClassifierTrainConfig:
    """How :func:`toy.classifier.train_classifier` trains; the defaults suit ShapeStories (any size) on a CPU."""

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
    checkpoint_every: int = 100  # optimizer steps between checkpoints; a killed run resumes from the newest
    keep_checkpoints: int = 2  # the newest ones kept while training; a finished run keeps none
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
            (self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1"),
        ]
        validate(self, checks)


@dataclass
class ClipTrainConfig:
    """How :func:`toy.clip.train_clip` trains the tiny CLIP; the defaults suit ShapeStories on a CPU.

    The model is ``toy.builders.build_tiny_clip`` (32 px input, width 32), trained from scratch on
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
    checkpoint_every: int = 100  # optimizer steps between checkpoints; a killed run resumes from the newest
    keep_checkpoints: int = 2  # the newest ones kept while training; a finished run keeps none
    seed: int = 0

    def __post_init__(self) -> None:
        validate(
            self,
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
                (self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1"),
                (self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1"),
            ],
        )


@dataclass
class TextBaselineTrainConfig:
    """How :func:`toy.text_lm.train_text_baseline` trains the tiny text-only LM.

    The model is ``toy.builders.build_tiny_causal_lm``, trained from scratch as a language model on
    the train split's story captions in exactly the prompt layout :class:`eval.baselines.TextOnlyBaseline`
    reads, one sequence per story (every prefix of it is one of the baseline's prompts).
    """

    max_steps: int = 200  # 1,000 ShapeStories stories: loss 0.43 at step 150, 0.42 at 300
    batch_size: int = 32  # stories per step
    learning_rate: float = 3e-3  # peak AdamW rate, after linear warm-up, then cosine decay to zero
    weight_decay: float = 0.01
    warmup_steps: int = 20  # capped at max_steps
    cpu_threads: int | None = 1  # torch CPU threads while training (None: torch's default), as clip_training
    checkpoint_every: int = 100  # optimizer steps between checkpoints; a killed run resumes from the newest
    keep_checkpoints: int = 2  # the newest ones kept while training; a finished run keeps none
    seed: int = 0

    def __post_init__(self) -> None:
        validate(
            self,
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
                (self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1"),
                (self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1"),
            ],
        )
