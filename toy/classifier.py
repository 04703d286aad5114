"""Train the frame classifier of :mod:`eval.classifier` on labelled frames (ShapeStories, *SV).

Make-A-Story scores generated frames with a classifier finetuned on each dataset's labelled frames; this
trains ours from scratch, in seconds on a CPU for ShapeStories. The trained folder holds the weights and
``classifier.json`` (:meth:`FrameClassifier.save_pretrained`), plus ``train_log.jsonl`` and
``train_config.json``, all written at the end. While it trains, only ``checkpoints/`` is written
(``pipeline.training.TrainingRun``); a killed run resumes from the newest with ``resume=True`` and ends
exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from eval.classification_metrics import background_scores, character_scores
from eval.classifier import CONFIG_FILE, IGNORE_BACKGROUND, FrameClassifier, images_to_uint8, normalize
from pipeline.data.vist import VistFrame, load_vist_split, sis_path
from pipeline.errors import DataError, StorypipeError
from pipeline.io import atomic_write_folder, atomic_write_json, load_rgb
from pipeline.training import (
    CHECKPOINTS_DIR,
    LOG_FILE,
    TrainingRun,
    global_batch_indices,
    seeded_generator,
    write_log,
)
from toy.config import ClassifierTrainConfig

TRAIN_CONFIG_FILE = "train_config.json"

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
    overwrite: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a :class:`FrameClassifier` on the labelled frames of ``split``; return its validation scores.

    Validation uses the labelled ``val`` split when the folder has one (and ``split`` is not ``val``),
    else a seeded ``cfg.val_fraction`` of the frames, held out from training. Frames are decoded once and
    kept in memory as uint8 at ``cfg.image_size``. While training, only ``out_dir/checkpoints`` is
    written (every ``cfg.checkpoint_every`` steps; ``resume=True`` continues from the newest, exactly as
    the uninterrupted run); the classifier, ``train_config.json`` and the log are written at the end,
    atomically, beside any other files of ``out_dir``. A folder that already holds a classifier is
    refused unless ``overwrite``.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    started = time.perf_counter()
    if overwrite and resume:
        raise StorypipeError("overwrite starts a fresh run and resume continues one: choose one")
    if not (overwrite or resume) and ((out_dir / LOG_FILE).exists() or (out_dir / CONFIG_FILE).exists()):
        raise StorypipeError(f"{out_dir} already holds a classifier run; choose another output folder")
    if overwrite:
        shutil.rmtree(out_dir / CHECKPOINTS_DIR, ignore_errors=True)  # an interrupted run's, replaced too

    with TrainingRun(
        out_dir, "train-classifier", checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints, resume=resume, log_file=False,
    ) as training:  # fmt: skip
        # 1. Labelled frames, and where validation comes from.
        frames = load_labelled_frames(data_dir, split)
        if not frames:
            raise DataError(
                f"no frame of split {split!r} in {data_dir} has labels (a 'labels' entry with a 'characters' "
                f"list in the images list of {sis_path(data_dir, split).name}). The classifier needs labelled "
                "frames: ShapeStories (`storypipe toy-data`) or FlintstonesSV/PororoSV from `storypipe "
                "convert-storysv`."
            )
        has_val_split = split != "val" and sis_path(data_dir, "val").is_file()
        val_frames = load_labelled_frames(data_dir, "val") if has_val_split else []
        if val_frames:
            train_frames, validation = frames, "the val split"
        else:
            if len(frames) < 2:
                raise DataError(
                    f"split {split!r} of {data_dir} has one labelled frame: too few to hold any out"
                )
            generator = seeded_generator(cfg.seed, "held-out frames")
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
        pixels = images_to_uint8(
            [load_rgb(f.image_file) for f in train_frames], cfg.image_size
        )  # (N, 3, S, S)

        # 3. Model, optimizer and a one-cycle schedule; the model's initial weights come from the seed.
        device = training.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = FrameClassifier(characters, backgrounds, cfg.image_size, cfg.channels).to(device)
        pixels, character_targets, background_targets = (
            t.to(device) for t in (pixels, character_targets, background_targets)
        )
        batch_size = min(cfg.batch_size, len(train_frames))
        steps_per_epoch = math.ceil(len(train_frames) / batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.learning_rate, total_steps=total_steps
        )
        model, optimizer = training.prepare(model, optimizer)
        training.accelerator.register_for_checkpointing(scheduler)
        start_step = training.start(total_steps)

        # 4. The loop: step s trains on batch s of the seeded per-epoch order, flipped by (seed, s).
        model.train()
        for step in range(start_step, total_steps):
            batch = torch.tensor(global_batch_indices(step, len(train_frames), batch_size, cfg.seed))  # (B,)
            batch = batch.to(device)
            images = pixels[batch]  # (B, 3, S, S)
            if cfg.horizontal_flip:
                flips = seeded_generator(cfg.seed, "horizontal flip", step)
                flip = (torch.rand(len(batch), generator=flips) < 0.5).to(device)  # (B,)
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)  # (B, 3, S, S)
            character_logits, background_logits = model(normalize(images))  # (B, C), (B, G) or None
            loss = F.binary_cross_entropy_with_logits(character_logits, character_targets[batch])
            if background_logits is not None and bool((background_targets[batch] != IGNORE_BACKGROUND).any()):
                loss = loss + F.cross_entropy(
                    background_logits, background_targets[batch], ignore_index=IGNORE_BACKGROUND
                )
            optimizer.zero_grad(set_to_none=True)
            training.accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            training.log({"step": step + 1, "epoch": step // steps_per_epoch, "loss": loss.item(),
                          "lr": scheduler.get_last_lr()[0]})  # fmt: skip
            training.maybe_checkpoint(step + 1)

        # 5. Validate, then save the classifier, its settings and the log (with the scores last).
        model.eval()
        scores = evaluate_classifier(model, val_frames)
        scores = {**scores, "validation": validation, "train_frames": len(train_frames)}
        log = [
            *training.records,
            {"step": total_steps, **scores, "seconds": round(time.perf_counter() - started, 2)},
        ]
        model.cpu()

        def write(staging: Path) -> None:
            model.save_pretrained(staging)
            train_config = {**asdict(cfg), "data_dir": str(data_dir), "split": split}
            atomic_write_json(staging / TRAIN_CONFIG_FILE, train_config)
            write_log(staging / LOG_FILE, log)

        atomic_write_folder(out_dir, write, keep_existing_files=True)  # other files of out_dir stay
        training.finish()
    return scores
