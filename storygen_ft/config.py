"""Config section ``generator``: the StoryGen-style diffusion model and its sampling defaults."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass
class GeneratorConfig:
    # A Stable Diffusion 1.5-layout diffusers folder (unet, vae, text_encoder, tokenizer, scheduler).
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    resolution: int = 512
    max_references: int = 3  # previous frames the added cross-attention reads (StoryGen uses 3)
    num_inference_steps: int = 40
    guidance_scale: float = 7.0  # text guidance
    image_guidance_scale: float = 3.5  # reference-frame guidance
    # Training memory knobs for a 24 GB card at 512².
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = True
    use_8bit_adam: bool = True

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ConfigError("generator.base_model must name a hub id or a local folder")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"generator.resolution must be a positive multiple of 8, got {self.resolution}")
        if self.max_references < 0:
            raise ConfigError(f"generator.max_references must be >= 0, got {self.max_references}")
        if self.num_inference_steps < 1:
            raise ConfigError(f"generator.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale < 0 or self.image_guidance_scale < 0:
            raise ConfigError("generator.guidance_scale and generator.image_guidance_scale must be >= 0")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(
                f"generator.mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}"
            )
