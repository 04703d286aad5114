"""CLIP similarities of the visual-storytelling paper: raw cosines of CLIP embeddings.

The paper reports plain cosine similarities of CLIP ViT-B/32 embeddings (``../shared/reference.md``):
text–image values are about 0.2–0.35. That is NOT CLIPScore (Hessel et al. 2021), which rescales the
cosine (``2.5 * max(cos, 0)``, or ``100 * cos`` in torchmetrics), so numbers from here are directly
comparable with the paper's tables and not with CLIPScore tables.

Four numbers, for a story whose frames (seed frame 0 included) are embedded as rows of a tensor:

* **text–image**: cosine of each frame's text with its image (:meth:`ClipSimilarity.text_image`);
* **previous-image**: mean cosine of frame k with frame k-1, k >= 1 (:func:`previous_image_similarity`);
* **GT-image**: mean cosine of generated frame k with ground-truth frame k, k >= 1 -- frame 0 is the
  shared seed, so it is left out (:func:`ground_truth_similarity`);
* **total story**: mean pairwise cosine over all frames, seed included, i < j (:func:`total_story_similarity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from pipeline.errors import model_load_error


def pooled_features(output: Any) -> torch.Tensor:
    """The projected embedding from ``CLIPModel.get_{text,image}_features``.

    transformers 4 returns the ``(N, D)`` tensor itself; transformers 5 returns a model output whose
    ``pooler_output`` holds the projected embedding.
    """
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class ClipSimilarity:
    """A CLIP model and its processor, for raw-cosine text–image and image–image similarities."""

    model: CLIPModel
    processor: Any  # CLIPProcessor (tokenizer + image processor; the PIL backend without torchvision)
    device: torch.device
    batch_size: int = 32

    @classmethod
    def load(
        cls, name_or_path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32
    ) -> ClipSimilarity:
        """Load a CLIP model folder or hub id (e.g. ``openai/clip-vit-base-patch32``) with ``from_pretrained``."""
        try:
            processor = AutoProcessor.from_pretrained(name_or_path)
            model = CLIPModel.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise model_load_error(
                "CLIP model",
                name_or_path,
                exc,
                "Set eval.clip_model to a local CLIP folder or a reachable hub id "
                "(the papers use openai/clip-vit-base-patch32).",
            ) from exc
        device = torch.device(device)
        model.requires_grad_(False)
        return cls(model=model.to(device).eval(), processor=processor, device=device, batch_size=batch_size)

    # ------------------------------------------------------------------------------------------------
    # Embeddings
    # ------------------------------------------------------------------------------------------------

    @property
    def text_max_length(self) -> int:
        """Texts are truncated to this many tokens (CLIP's 77, or less if the tokenizer says so)."""
        return min(
            self.processor.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings
        )

    @property
    def image_size(self) -> int:
        """The vision tower's input resolution (224 for ViT-B/32)."""
        return int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected, UN-normalised image embeddings ``(N, D)`` (float32, on the CPU), in batches."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.processor.image_processor(images=batch, return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, self.model.dtype)  # (B, 3, H, W)
            output = self.model.get_image_features(pixel_values=pixels)
            chunks.append(pooled_features(output).float().cpu())  # (B, D)
        if not chunks:
            return torch.empty(0, self.model.config.projection_dim)
        return torch.cat(chunks)  # (N, D)

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings ``(N, D)``."""
        return F.normalize(self.image_features(images), dim=-1)  # (N, D)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, D)``; each text is truncated to :attr:`text_max_length`."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.text_max_length,
                return_tensors="pt",
            ).to(self.device)
            output = self.model.get_text_features(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            )
            chunks.append(pooled_features(output).float().cpu())  # (B, D)
        if not chunks:
            return torch.empty(0, self.model.config.projection_dim)
        return F.normalize(torch.cat(chunks), dim=-1)  # (N, D)

    # ------------------------------------------------------------------------------------------------
    # Pairwise similarities
    # ------------------------------------------------------------------------------------------------

    def text_image(self, texts: Sequence[str], images: Sequence[Image.Image]) -> list[float]:
        """Raw cosine of text i with image i, for every i (not CLIPScore: no x2.5 or x100, no clipping)."""
        _same_length(texts, images, "texts", "images")
        return paired_cosines(self.text_embeddings(texts), self.image_embeddings(images))

    def image_image(self, a: Sequence[Image.Image], b: Sequence[Image.Image]) -> list[float]:
        """Raw cosine of image ``a[i]`` with image ``b[i]``, for every i."""
        _same_length(a, b, "a", "b")
        return paired_cosines(self.image_embeddings(a), self.image_embeddings(b))


def _same_length(a: Sequence[Any], b: Sequence[Any], name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must pair up one to one: got {len(a)} and {len(b)}")


def paired_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Cosine of row i of ``a`` with row i of ``b``; both ``(N, D)``."""
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).tolist()  # (N,)


# ----------------------------------------------------------------------------------------------------
# Story-level similarities over one story's frame embeddings (row 0 = the seed frame)
# ----------------------------------------------------------------------------------------------------


def previous_image_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine of frame k with frame k-1 over k >= 1; ``embeddings`` is ``(N, D)`` with N >= 2."""
    if embeddings.shape[0] < 2:
        raise ValueError(f"previous-image similarity needs at least 2 frames, got {embeddings.shape[0]}")
    return float(torch.tensor(paired_cosines(embeddings[1:], embeddings[:-1])).mean())


def ground_truth_similarity(generated: torch.Tensor, ground_truth: torch.Tensor) -> float:
    """Mean cosine of generated frame k with ground-truth frame k over k >= 1 (frame 0 is the shared seed).

    Both are ``(N, D)`` with the same N >= 2.
    """
    if generated.shape != ground_truth.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and ground truth {tuple(ground_truth.shape)}")
    if generated.shape[0] < 2:
        raise ValueError(f"GT-image similarity needs at least 2 frames, got {generated.shape[0]}")
    return float(torch.tensor(paired_cosines(generated[1:], ground_truth[1:])).mean())


def total_story_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine over all frame pairs i < j, the seed frame included; ``embeddings`` is ``(N, D)``, N >= 2."""
    count = embeddings.shape[0]
    if count < 2:
        raise ValueError(f"total-story similarity needs at least 2 frames, got {count}")
    unit = F.normalize(embeddings, dim=-1)  # (N, D)
    cosines = unit @ unit.T  # (N, N)
    upper = torch.triu_indices(count, count, offset=1)  # (2, N*(N-1)/2)
    return float(cosines[upper[0], upper[1]].mean())
