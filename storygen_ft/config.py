"""Config section ``generator``: the StoryGen-style diffusion model, its sampling defaults and training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import ModelPath, validate

SCHEDULERS = ("ddim", "ddpm", "euler", "dpm")
# What makes the model, for the error when its folder is missing.
BASE_MODEL_ADVICE = (
    "`storypipe finetune-storygen` (or `make finetune-storygen`) writes one; `make toy` trains the toy models, "
    "and --preset tiny builds a tiny model offline."
)


@dataclass
class GeneratorTrainConfig:
    max_steps: int = 50_000  # the source paper's run
    batch_size: int = 4  # per GPU, per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5  # StoryGen's
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    max_grad_norm: float = 1.0
    text_dropout: float = 0.05  # caption dropout, for text guidance
    reference_dropout: float = 0.1  # blank references with empty captions, for image guidance
    # Caption an example with its story caption (and its references with theirs) instead of the
    # descriptions, so the model also learns to resolve "he"/"she"/"they" from the reference frames.
    story_caption_probability: float = 0.0
    unet_lora_rank: int | None = (
        None  # also train a LoRA on the UNet's attention; None trains only the new layers
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"  # used on CUDA only
    gradient_checkpointing: bool = True
    use_8bit_adam: bool = True  # bitsandbytes AdamW8bit, on CUDA only
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self, [
            *((getattr(self, name) >= 1, name, "must be >= 1")
              for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints")),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            *((0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
              for name in ("text_dropout", "reference_dropout", "story_caption_probability")),
            (self.unet_lora_rank is None or self.unet_lora_rank >= 1, "unet_lora_rank", "must be >= 1 or null"),
        ])  # fmt: skip


@dataclass
class GeneratorPretrainConfig:
    """`storypipe pretrain-diffusion`: a diffusion base from scratch (the toy models), in two phases.

    First the VAE learns to reconstruct the training frames; then the UNet learns single-frame
    text-to-image on them (StoryGen's first stage), with the frozen VAE and text encoder.
    """

    vae_steps: int = 600
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-6  # a near-deterministic autoencoder, as SD's VAE is in practice
    unet_steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2e-3  # peak of a cosine schedule
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    text_dropout: float = 0.1  # empty prompts, so classifier-free guidance has an unconditional branch
    story_caption_probability: float = 0.3  # prompt with the story caption instead of the description
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self, [
            *((getattr(self, name) >= 0, name, "must be >= 0") for name in ("vae_steps", "unet_steps")),
            *((getattr(self, name) >= 1, name, "must be >= 1")
              for name in ("vae_batch_size", "batch_size", "checkpoint_every", "keep_checkpoints")),
            *((getattr(self, name) > 0, name, "must be > 0") for name in ("vae_learning_rate", "learning_rate")),
            *((0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
              for name in ("text_dropout", "story_caption_probability")),
        ])  # fmt: skip


@dataclass
class TinyDiffusionSettings:
    """Sizes of a tiny SD-1.5-layout model (VAE, CLIP text encoder, UNet) built offline when missing."""

    resolution: int = 32
    block_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 32
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    vocab_size: int = 512
    # The first (highest-resolution) UNet levels that have no attention, only ResNet blocks: cheaper,
    # and text still steers the lower levels. 0 puts cross-attention on every level.
    levels_without_attention: int = 0
    # GroupNorm groups, capped at the narrowest width. Keep several channels per group: with one channel
    # per group every norm erases each channel's mean, i.e. the flat colours a tiny model must carry.
    norm_groups: int = 32
    vae_mid_attention: bool = True  # the VAE's self-attention at its lowest resolution
    # A CLIP model folder whose text tower and tokenizer become the text encoder, as SD 1.5 uses CLIP's
    # (e.g. the toy CLIP from `storypipe train-clip`); None builds a random one.
    text_encoder: ModelPath | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self, [
            (self.norm_groups >= 1, "norm_groups", "must be >= 1"),
            (len(self.block_channels) >= 1, "block_channels", "must not be empty"),
            (len(self.vae_channels) >= 1, "vae_channels", "must not be empty"),
            (0 <= self.levels_without_attention < len(self.block_channels), "levels_without_attention",
             "must leave at least one level with attention"),
            (self.resolution % (2 ** (len(self.vae_channels) - 1)) == 0, "resolution",
             "must be divisible by the VAE's downsampling factor"),
        ])  # fmt: skip


WEIGHT_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class GeneratorConfig:
    # A Stable Diffusion 1.5-layout diffusers folder (unet, vae, text_encoder, tokenizer, scheduler),
    # or a folder written by `storypipe finetune-storygen` (the same plus the added layers).
    base_model: ModelPath = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # "storygen": an added cross-attention over the reference frames' features (StoryGen).
    # "storygen_exact": StoryGen's own block math, for weights from `storypipe import-storygen`.
    # "memory": Make-A-Story's memory attention (current sentence -> previous sentences -> previous frames).
    context: Literal["storygen", "storygen_exact", "memory"] = "storygen"
    resolution: int = 512
    max_references: int = 3  # previous frames the context reads (StoryGen uses 3)
    scheduler: str = "ddim"
    num_inference_steps: int = 40
    guidance_scale: float = 7.0  # text guidance
    image_guidance_scale: float = 3.5  # reference-frame guidance
    # StoryGen noises reference i of N (oldest first) to (t // divisor) * (N - i): the newest is least noisy.
    reference_timestep_divisor: int = 10
    # "per_step": reference features recomputed at every denoising step (faithful to StoryGen).
    # "once": fast mode, computed once per frame at `fast_reference_timestep` and reused.
    reference_features: Literal["per_step", "once"] = "per_step"
    fast_reference_timestep: int = 50
    # The blank references' features (the uncond branch's) depend only on the timestep, so they are kept
    # across frames, in host memory, up to this many MiB (SD 1.5 at 512², 40 steps: about 2.3 GiB in
    # fp16 for all of them); 0 computes them at every step.
    blank_reference_cache_mib: int = 3072
    edit_strength: float = 0.5  # img2img noise for `storypipe edit` (the source paper used 50%)
    # The weights' dtype at inference: "auto" is float16 on CUDA (half the memory of SD 1.5's fp32
    # weights) and float32 on a CPU, where half-precision kernels are slow or missing.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # see WEIGHT_DTYPES
    train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)
    # When set and `base_model` is a folder that does not exist yet, a tiny model is built there.
    tiny: TinyDiffusionSettings | None = None
    # `storypipe pretrain-diffusion` settings (toy models from scratch); None where the base is pretrained.
    pretrain: GeneratorPretrainConfig | None = None

    def __post_init__(self) -> None:
        validate(self, [
            (bool(self.base_model), "base_model", "must name a hub id or a local folder"),
            (self.resolution >= 8 and self.resolution % 8 == 0, "resolution", "must be a positive multiple of 8"),
            (self.max_references >= 0, "max_references", "must be >= 0"),
            (self.scheduler in SCHEDULERS, "scheduler", f"must be one of {', '.join(SCHEDULERS)}"),
            (self.num_inference_steps >= 1, "num_inference_steps", "must be >= 1"),
            (self.guidance_scale >= 0, "guidance_scale", "must be >= 0"),
            (self.image_guidance_scale >= 0, "image_guidance_scale", "must be >= 0"),
            (self.reference_timestep_divisor >= 1, "reference_timestep_divisor", "must be >= 1"),
            (self.blank_reference_cache_mib >= 0, "blank_reference_cache_mib", "must be >= 0"),
            (0 < self.edit_strength <= 1, "edit_strength", "must be in (0, 1]"),
            (self.dtype in WEIGHT_DTYPES, "dtype", f"must be one of {', '.join(WEIGHT_DTYPES)}"),
        ])  # fmt: skip

    def torch_dtype_name(self, device_type: str) -> str:
        """The dtype the weights load in on a device of ``device_type`` (``cuda``, ``cpu``, ...)."""
        if self.dtype != "auto":
            return self.dtype
        return "float16" if device_type == "cuda" else "float32"
