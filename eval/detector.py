"""Objects per image: a transformers object detector counts confident detections in each frame.

The paper reports the mean number of detected objects per generated image (SD-1.5 4.58, SDXL-Turbo 4.69,
ours 4.57; ``../shared/reference.md``). Any ``AutoModelForObjectDetection`` checkpoint works (DETR,
YOLOS...); ``eval.detector_model`` picks it. A detection counts when its score (the processor's
``post_process_object_detection`` score: for DETR/YOLOS the best non-"no object" class probability)
is >= the threshold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from pipeline.errors import model_load_error


@dataclass
class ObjectCounter:
    """A detector, its image processor and a score threshold."""

    model: Any  # an AutoModelForObjectDetection model
    processor: Any  # its image processor (a PIL backend works without torchvision)
    threshold: float
    device: torch.device
    batch_size: int = 8

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        threshold: float = 0.7,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
    ) -> ObjectCounter:
        """Load a detector folder or hub id (e.g. ``hustvl/yolos-small``) with ``from_pretrained``."""
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path)
            model = AutoModelForObjectDetection.from_pretrained(name_or_path)
        except (OSError, ValueError, ImportError) as exc:
            raise model_load_error(
                "object detector",
                name_or_path,
                exc,
                "Set eval.detector_model to a local detector folder or a reachable hub id (a backbone-free one "
                "such as YOLOS needs neither timm nor torchvision), or null to skip.",
            ) from exc
        device = torch.device(device)
        model.requires_grad_(False)
        return cls(model.to(device).eval(), processor, threshold, device, batch_size)

    @torch.no_grad()
    def detections(self, images: Sequence[Image.Image]) -> list[dict[str, torch.Tensor]]:
        """Post-processed detections per image (``scores``, ``labels``, ``boxes`` in pixels), score >= threshold.

        Images are batched only with others of the same size: the processor pads a mixed batch, and a
        detector without a pixel mask (YOLOS) would then see the padding, so a count would depend on
        which images happened to share its batch.
        """
        rgb = [image.convert("RGB") for image in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(rgb):
            groups.setdefault(image.size, []).append(index)
        results: list[dict[str, torch.Tensor] | None] = [None] * len(rgb)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = [rgb[index] for index in chunk]
                inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
                outputs = self.model(**inputs)
                # Keep every query here (the processor keeps score > its threshold), then apply >= below.
                processed = self.processor.post_process_object_detection(
                    outputs,
                    threshold=float("-inf"),
                    target_sizes=[(image.height, image.width) for image in batch],
                )
                for index, found in zip(chunk, processed, strict=True):
                    keep = found["scores"] >= self.threshold  # (Q,)
                    results[index] = {key: value[keep].cpu() for key, value in found.items()}
        return [result for result in results if result is not None]

    def count(self, images: Sequence[Image.Image]) -> list[int]:
        """The number of detections with score >= threshold in each image."""
        return [len(found["scores"]) for found in self.detections(images)]

    @staticmethod
    def histogram(counts: Iterable[int]) -> dict[int, int]:
        """How many images have each count, for every count from 0 to the largest (zeros included)."""
        tally = Counter(counts)
        if not tally:
            return {}
        if min(tally) < 0:
            raise ValueError("object counts cannot be negative")
        return {count: tally.get(count, 0) for count in range(max(tally) + 1)}
