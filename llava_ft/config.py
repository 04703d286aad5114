"""Config section ``captioner``: the LLaVA base, its two LoRA adapters, training and sampling."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.config import ModelPath, validate
from pipeline.errors import InvalidConfigValue

TASKS = ("story", "description")
PRETRAIN_TASK = "caption"  # image -> its own description: full-parameter pretraining of a toy base
# What makes the base model, for the error when its folder is missing.
BASE_MODEL_ADVICE = (
    "`storypipe pretrain-llava` trains a toy base (`make toy` trains every toy model); real runs name a hub "
    "id such as llava-hf/llava-1.5-7b-hf, and --preset tiny builds a tiny base offline."
)


def adapter_advice(task: str) -> str:
    """What makes ``task``'s adapter, for the error when it is missing or does not load."""
    return (
        f"Train it with `storypipe finetune-llava --task {task}` (or `make finetune-llava`), "
        f"or set captioner.{task}_adapter=null to answer zero-shot."
    )


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # A regex over module names (peft matches it in full): the language model's linear layers only.
    # A plain list like ["q_proj", "v_proj"] would also hit the CLIP vision tower.
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # Whole modules trained and saved with the adapter (peft's modules_to_save), e.g. ["lm_head"] when
    # the task's words were never targets of the base's training (the toy base learned descriptions only).
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate(self, [
            (self.r >= 1, "r", "must be >= 1"),
            (self.alpha >= 1, "alpha", "must be >= 1"),
            (0 <= self.dropout < 1, "dropout", "must be in [0, 1)"),
        ])  # fmt: skip
        try:
            re.compile(self.target_modules)
        except re.error as exc:
            raise InvalidConfigValue(
                type(self).__name__, "target_modules", f"is not a valid regex: {exc}"
            ) from None


@dataclass
class CaptionerTrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 4  # per device, per micro-batch
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # used on CUDA only; the CPU trains in fp32
    checkpoint_every: int = 200  # optimizer steps; a killed run loses at most this many
    keep_checkpoints: int = 2
    eval_every: int = 100
    eval_fraction: float = 0.02  # held-out slice of the samples, for the eval loss
    max_eval_samples: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self, [
            *((getattr(self, name) >= 1, name, "must be >= 1")
              for name in ("epochs", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "eval_every",
                           "keep_checkpoints")),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (0 <= self.eval_fraction < 1, "eval_fraction", "must be in [0, 1)"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "must be 'no', 'fp16' or 'bf16'"),
        ])  # fmt: skip


@dataclass
class TinyLlavaSettings:
    """Sizes of a tiny LLaVA (tiny CLIP tower + tiny Llama) built offline when ``base_model`` is missing."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 32
    vision_layers: int = 2
    text_hidden_size: int = 64
    text_layers: int = 2
    attention_heads: int = 4
    vocab_size: int = 512  # byte-level BPE trained on the prompts and the ShapeStories vocabulary
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self, [
            (self.image_size % self.patch_size == 0, "image_size", "must be a multiple of patch_size"),
            (self.text_hidden_size % self.attention_heads == 0, "text_hidden_size", "must be a multiple of attention_heads"),
            (self.vision_hidden_size % self.attention_heads == 0, "vision_hidden_size",
             "must be a multiple of attention_heads"),
            (self.vocab_size >= 300, "vocab_size", "must be >= 300 (256 bytes + special tokens + merges)"),
        ])  # fmt: skip


@dataclass
class CaptionerConfig:
    # A hub id or a local model folder; loaded with `from_pretrained` either way.
    base_model: ModelPath = "llava-hf/llava-1.5-7b-hf"
    # PEFT adapter folders (written by `storypipe finetune-llava`); None answers zero-shot with the base.
    story_adapter: ModelPath | None = None
    description_adapter: ModelPath | None = None
    # QLoRA: a 4-bit nf4 base with bf16 compute, so training fits one 24 GB GPU. Training uses it on
    # CUDA only; inference may use it anywhere bitsandbytes runs.
    load_in_4bit: bool = True
    gradient_checkpointing: bool = True
    # Sampling; the source paper's best temperature was 0.2.
    temperature: float = 0.2
    top_p: float = 0.9
    max_new_tokens: int = 48
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: CaptionerTrainConfig = field(default_factory=CaptionerTrainConfig)
    # `storypipe pretrain-llava`: every parameter of a tiny base built from `tiny`, trained from scratch
    # on the caption task (toy models); None where the base is pretrained already (real LLaVA).
    pretrain: CaptionerTrainConfig | None = None
    # When set and `base_model` is a folder that does not exist yet, a tiny LLaVA is built there.
    tiny: TinyLlavaSettings | None = None

    def __post_init__(self) -> None:
        validate(self, [
            (bool(self.base_model), "base_model", "must name a hub id or a local folder"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
        ])  # fmt: skip

    def adapter_for(self, task: str) -> str | None:
        if task not in TASKS:
            raise ValueError(f"unknown captioner task {task!r}; expected one of {TASKS}")
        return self.story_adapter if task == "story" else self.description_adapter
