"""Config section ``captioner``: the LLaVA base, its two LoRA adapters, and sampling."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass
class CaptionerConfig:
    # A hub id or a local model folder; loaded with `from_pretrained` either way.
    base_model: str = "llava-hf/llava-1.5-7b-hf"
    # PEFT adapter folders (written by `storypipe finetune-llava`); None answers zero-shot with the base.
    story_adapter: str | None = None
    description_adapter: str | None = None
    # QLoRA: a 4-bit nf4 base with bf16 compute, so training fits one 24 GB GPU. Used on CUDA only.
    load_in_4bit: bool = True
    gradient_checkpointing: bool = True
    # Sampling; the source paper's best temperature was 0.2.
    temperature: float = 0.2
    top_p: float = 0.9
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ConfigError("captioner.base_model must name a hub id or a local folder")
        if self.temperature < 0:
            raise ConfigError(f"captioner.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"captioner.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"captioner.max_new_tokens must be >= 1, got {self.max_new_tokens}")
