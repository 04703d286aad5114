"""A small multi-label frame classifier for Make-A-Story's character and background metrics.

Make-A-Story scores generated frames with an Inception-v3 classifier finetuned on each dataset's
labelled frames. We use a compact CNN written out here instead: torchvision and its pretrained
weights are not available to this project, and ShapeStories frames (flat colours, one sky and one
ground band, characters in exact colours) are easy enough that a few conv layers reach near-perfect
accuracy in seconds on a CPU. The metric code (:mod:`eval.classification_metrics`) does not care which
classifier produced the predictions, so a stronger one can be dropped in for FlintstonesSV/PororoSV.

Two heads share the features:

* **characters**: one logit per name, multi-hot targets, sigmoid + BCE; a name is predicted at p >= 0.5;
* **background**: softmax + CE over the background vocabulary, only when the dataset has backgrounds
  (PororoSV frames have ``"background": null``; frames without one are left out of that loss).

A trained model is a folder: ``classifier.safetensors`` (weights) and ``classifier.json`` (label
vocabularies, image size, architecture sizes), read by :meth:`FrameClassifier.from_pretrained`.
It is trained by :func:`toy.classifier.train_classifier` (`storypipe train-classifier`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from eval.config import CLASSIFIER_CONFIG_FILE as CONFIG_FILE
from pipeline.errors import StorypipeError
from pipeline.io import atomic_write_folder, atomic_write_json

WEIGHTS_FILE = "classifier.safetensors"
FORMAT_VERSION = 1
CHARACTER_THRESHOLD = 0.5  # a character is predicted when its sigmoid probability reaches this
IGNORE_BACKGROUND = -100  # target index of frames without a background (F.cross_entropy's ignore_index)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class FrameClassifier(nn.Module):
    """Conv blocks (3x3 conv with stride 2, batch norm, ReLU), global average + max pooling, two heads."""

    def __init__(
        self,
        characters: Sequence[str],
        backgrounds: Sequence[str] = (),
        image_size: int = 64,
        channels: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.characters = list(characters)
        self.backgrounds = list(backgrounds)
        self.image_size = image_size
        self.channels = list(channels)
        layers: list[nn.Module] = []
        width = 3
        for out in self.channels:
            # A strided conv halves the resolution: 3x cheaper on a CPU than a conv then a 2x2 max pool.
            layers += [
                nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            width = out
        self.features = nn.Sequential(*layers)
        # Average pooling sees the sky and ground bands; max pooling keeps small features (a star, a rock).
        self.character_head = nn.Linear(2 * width, len(self.characters))
        self.background_head = nn.Linear(2 * width, len(self.backgrounds)) if self.backgrounds else None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Character logits ``(B, C)`` and background logits ``(B, G)`` (``None`` without backgrounds)."""
        features = self.features(pixels)  # (B, W, h, w)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)  # (B, 2W)
        character_logits = self.character_head(pooled)  # (B, C)
        background_logits = (
            self.background_head(pooled) if self.background_head is not None else None
        )  # (B, G)
        return character_logits, background_logits

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image], batch_size: int = 256) -> list[dict[str, Any]]:
        """``{"characters": [names, in vocabulary order], "background": name or None}`` per image.

        Images of any size and mode are converted to RGB and resized to the model's ``image_size``.
        """
        was_training = self.training
        self.eval()
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):
            batch = images_to_uint8(images[start : start + batch_size], self.image_size)  # (B, 3, S, S)
            character_logits, background_logits = self(normalize(batch.to(self.device)))
            present = (torch.sigmoid(character_logits) >= CHARACTER_THRESHOLD).cpu()  # (B, C)
            best = background_logits.argmax(dim=1).cpu() if background_logits is not None else None  # (B,)
            for row in range(present.shape[0]):
                results.append(
                    {
                        "characters": [
                            name
                            for name, on in zip(self.characters, present[row].tolist(), strict=True)
                            if on
                        ],
                        "background": self.backgrounds[int(best[row])] if best is not None else None,
                    }
                )
        self.train(was_training)
        return results

    # ----------------------------------------------------------------------------------------
    # Loading and saving
    # ----------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the weights and ``classifier.json`` atomically; other files in ``folder`` (the log) stay."""
        settings = {
            "format": FORMAT_VERSION,
            "characters": self.characters,
            "backgrounds": self.backgrounds,
            "image_size": self.image_size,
            "channels": self.channels,
            "character_threshold": CHARACTER_THRESHOLD,
        }
        weights = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}

        def write(staging: Path) -> None:
            save_file(weights, str(staging / WEIGHTS_FILE))
            atomic_write_json(staging / CONFIG_FILE, settings)

        return atomic_write_folder(folder, write, keep_existing_files=True)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> FrameClassifier:
        """Load a folder written by :meth:`save_pretrained`, in eval mode on the CPU."""
        folder = Path(folder)
        config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not config_file.is_file() or not weights_file.is_file():
            raise StorypipeError(
                f"{folder} is not a frame classifier: it needs {CONFIG_FILE} and {WEIGHTS_FILE}. "
                "Train one on labelled frames with `storypipe train-classifier`."
            )
        try:
            settings = json.loads(config_file.read_text(encoding="utf-8"))
            model = cls(
                characters=settings["characters"],
                backgrounds=settings["backgrounds"],
                image_size=int(settings["image_size"]),
                channels=settings["channels"],
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StorypipeError(
                f"{config_file} is not a valid classifier config ({exc}); retrain it"
            ) from exc
        model.load_state_dict(load_file(str(weights_file)))
        return model.eval()


def images_to_uint8(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB ``size`` x ``size`` pixels as a ``(B, 3, S, S)`` uint8 tensor (bilinear, antialiased resize)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        arrays.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3))
    return torch.stack(arrays).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, S, S)`` in 0..255 to float in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0  # (B, 3, S, S)
