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
:func:`train_classifier` also leaves ``train_log.jsonl`` and ``train_config.json`` there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from eval.classification_metrics import background_scores, character_scores
from eval.config import ClassifierTrainConfig
from pipeline.errors import DataError, StorypipeError
from pipeline.io import atomic_write_folder, atomic_write_json
from pipeline.training import LOG_FILE, append_log
from pipeline.vist import VistFrame, load_rgb, load_vist_split, sis_path

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
TRAIN_CONFIG_FILE = "train_config.json"
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
                "Train one on labelled frames with eval.classifier.train_classifier."
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


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_labelled_frames(data_dir: str | Path, split: str) -> list[VistFrame]:
    """Every frame of the split's usable stories whose labels name its characters, once per photo.

    A frame is labelled when ``labels["characters"]`` is a list; ``labels["background"]`` may be absent
    or ``None``. Frames shared by overlapping stories (converted StorySV data) are kept once.
    """
    frames: dict[str, VistFrame] = {}
    for story in load_vist_split(data_dir, split).stories:
        for frame in story.frames:
            if isinstance(frame.labels, dict) and isinstance(frame.labels.get("characters"), list):
                frames.setdefault(frame.photo_id, frame)
    return list(frames.values())


def frame_characters(frame: VistFrame) -> list[str]:
    return list((frame.labels or {}).get("characters") or [])


def frame_background(frame: VistFrame) -> str | None:
    return (frame.labels or {}).get("background")


def evaluate_classifier(model: FrameClassifier, frames: Sequence[VistFrame]) -> dict[str, Any]:
    """Predict every frame's labels and score them with Make-A-Story's metrics.

    Returns ``frames``, ``character_accuracy``, ``character_f1``, ``background_accuracy`` and
    ``background_f1`` (the background ones are ``None`` when no frame has a true background).
    """
    predictions: list[dict[str, Any]] = []
    for start in range(0, len(frames), 256):
        chunk = frames[start : start + 256]  # decoded a chunk at a time
        predictions += model.predict([load_rgb(frame.image_file) for frame in chunk])
    characters = character_scores(
        [frame_characters(f) for f in frames], [p["characters"] for p in predictions], model.characters
    )
    backgrounds = background_scores(
        [frame_background(f) for f in frames], [p["background"] for p in predictions]
    )
    return {
        "frames": len(frames),
        "character_accuracy": characters["accuracy"],
        "character_f1": characters["f1"],
        "background_accuracy": backgrounds["accuracy"] if backgrounds else None,
        "background_f1": backgrounds["f1"] if backgrounds else None,
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_classifier(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: ClassifierTrainConfig,
    split: str = "train",
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a :class:`FrameClassifier` on the labelled frames of ``split``; return its validation scores.

    Validation uses the labelled ``val`` split when the folder has one (and ``split`` is not ``val``),
    else a seeded ``cfg.val_fraction`` of the frames, held out from training. ``progress(step, total)``
    is called after every optimizer step. Frames are decoded once and kept in memory as uint8 at
    ``cfg.image_size``.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    started = time.perf_counter()
    if (out_dir / LOG_FILE).exists() or (out_dir / CONFIG_FILE).exists():
        if not overwrite:
            raise StorypipeError(f"{out_dir} already holds a classifier run; choose another output folder")
        (out_dir / LOG_FILE).unlink(missing_ok=True)

    # 1. Labelled frames, and where validation comes from.
    frames = load_labelled_frames(data_dir, split)
    if not frames:
        raise DataError(
            f"no frame of split {split!r} in {data_dir} has labels (a 'labels' entry with a 'characters' list "
            f"in the images list of {sis_path(data_dir, split).name}). The classifier needs labelled frames: "
            "ShapeStories (`storypipe toy-data`) or FlintstonesSV/PororoSV from `storypipe convert-storysv`."
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    has_val_split = split != "val" and sis_path(data_dir, "val").is_file()
    val_frames = load_labelled_frames(data_dir, "val") if has_val_split else []
    if val_frames:
        train_frames, validation = frames, "the val split"
    else:
        if len(frames) < 2:
            raise DataError(f"split {split!r} of {data_dir} has one labelled frame: too few to hold any out")
        order = torch.randperm(len(frames), generator=generator).tolist()
        held_out = min(max(1, round(len(frames) * cfg.val_fraction)), len(frames) - 1)
        val_frames = [frames[i] for i in sorted(order[:held_out])]
        train_frames = [frames[i] for i in sorted(order[held_out:])]
        validation = f"{held_out} held-out frames of {split}"

    # 2. Vocabularies and targets, from the training frames.
    characters = sorted({name for frame in train_frames for name in frame_characters(frame)})
    backgrounds = sorted({b for frame in train_frames if (b := frame_background(frame)) is not None})
    if not characters:
        raise DataError(f"no labelled frame of split {split!r} in {data_dir} names a character")
    character_index = {name: i for i, name in enumerate(characters)}
    character_targets = torch.zeros(len(train_frames), len(characters))  # (N, C)
    for row, frame in enumerate(train_frames):
        character_targets[row, [character_index[name] for name in frame_characters(frame)]] = 1.0
    background_targets = torch.tensor(
        [
            backgrounds.index(b) if (b := frame_background(f)) is not None else IGNORE_BACKGROUND
            for f in train_frames
        ]
    )  # (N,)
    pixels = images_to_uint8([load_rgb(f.image_file) for f in train_frames], cfg.image_size)  # (N, 3, S, S)

    # 3. Model, optimizer and a one-cycle schedule; the model's initial weights come from the seed.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = FrameClassifier(characters, backgrounds, cfg.image_size, cfg.channels).to(device)
    pixels, character_targets, background_targets = (
        t.to(device) for t in (pixels, character_targets, background_targets)
    )
    steps_per_epoch = math.ceil(len(train_frames) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.learning_rate, total_steps=total_steps
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / TRAIN_CONFIG_FILE, {**asdict(cfg), "data_dir": str(data_dir), "split": split})

    # 4. The loop: a fresh seeded permutation every epoch.
    model.train()
    order = torch.randperm(len(train_frames), generator=generator)
    for step in range(total_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if position == 0 and step > 0:
            order = torch.randperm(len(train_frames), generator=generator)
        batch = order[position * cfg.batch_size : (position + 1) * cfg.batch_size].to(device)  # (B,)
        images = pixels[batch]  # (B, 3, S, S)
        if cfg.horizontal_flip:
            flip = (torch.rand(len(batch), generator=generator) < 0.5).to(device)  # (B,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)  # (B, 3, S, S)
        character_logits, background_logits = model(normalize(images))  # (B, C), (B, G) or None
        loss = F.binary_cross_entropy_with_logits(character_logits, character_targets[batch])
        if background_logits is not None and bool((background_targets[batch] != IGNORE_BACKGROUND).any()):
            loss = loss + F.cross_entropy(
                background_logits, background_targets[batch], ignore_index=IGNORE_BACKGROUND
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        append_log(
            out_dir / LOG_FILE,
            {"step": step + 1, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]},
        )
        if progress is not None:
            progress(step + 1, total_steps)

    # 5. Validate, save, and log the scores.
    model.eval()
    scores = evaluate_classifier(model, val_frames)
    model.cpu().save_pretrained(out_dir)
    scores = {**scores, "validation": validation, "train_frames": len(train_frames)}
    append_log(
        out_dir / LOG_FILE,
        {"step": total_steps, **scores, "seconds": round(time.perf_counter() - started, 2)},
    )
    return scores
