"""Config section ``eval``: the models the metrics load (hub ids or local folders)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass
class EvalConfig:
    # Sentence-embedding similarity: a RoBERTa-family model for the real preset.
    sentence_model: str = "sentence-transformers/all-roberta-large-v1"
    # CLIP similarities are raw cosines of ViT-B/32 embeddings, as in the source papers.
    clip_model: str = "openai/clip-vit-base-patch32"

    def __post_init__(self) -> None:
        for key in ("sentence_model", "clip_model"):
            if not getattr(self, key):
                raise ConfigError(f"eval.{key} must name a hub id or a local folder")
