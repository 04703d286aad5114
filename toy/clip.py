"""Train the tiny CLIP contrastively on a VIST-layout folder's (frame, DII description) pairs.

The untrained tiny CLIP (:func:`toy.builders.build_tiny_clip`) gives meaningless similarities; trained
on ShapeStories for a minute it tells characters, actions and backgrounds apart, so the CLIP metrics of
the ``tiny`` preset measure something. Its text tower also serves as a tiny Stable Diffusion text encoder.

The output is a plain CLIP folder: ``CLIPModel.from_pretrained(out)`` and ``CLIPProcessor.from_pretrained
(out)`` load it, and so do ``CLIPTextModel.from_pretrained(out)`` (the text tower alone: its config is
read from ``text_config``, and the vision weights are skipped) and ``AutoTokenizer.from_pretrained(out)``.
Beside the model: ``config.yaml`` (the resolved config), ``clip_metrics.json`` and ``train_log.jsonl``.
While it trains, the folder holds only ``checkpoints/`` (``pipeline.training.TrainingRun``); a killed run
resumes from the newest with ``resume=True`` and ends exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import CLIPModel, CLIPProcessor

from eval.image_metrics import pooled_features
from pipeline.data.vist import load_vist_split, sis_path
from pipeline.errors import DataError
from pipeline.training import (
    TrainingRun,
    global_batch_indices,
    seeded_generator,
    warmup_cosine_schedule,
)
from toy.builders import build_tiny_clip
from toy.config import ClipTrainConfig
from toy.run_folder import refuse_foreign_folder, write_model_folder

METRICS_FILE = "clip_metrics.json"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature so logits are scaled by at most 100


class PairSet:
    """Frames (as processed pixels) and their descriptions (as token ids), each kept once."""

    def __init__(self, pixels: torch.Tensor, descriptions: list[str], text_index: torch.Tensor) -> None:
        self.pixels = pixels  # (N, 3, H, W) float, already normalised by the CLIP image processor
        self.descriptions = descriptions  # the distinct descriptions, D of them
        self.text_index = text_index  # (N,) row of each frame's description in ``descriptions``
        self.input_ids = torch.empty(0, dtype=torch.long)  # (D, T), filled by ``tokenize``
        self.attention_mask = torch.empty(0, dtype=torch.long)  # (D, T)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def tokenize(self, tokenizer: Any) -> None:
        if not self.descriptions:  # an empty split
            return
        tokens = tokenizer(
            self.descriptions,
            padding="longest",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        )
        self.input_ids, self.attention_mask = tokens.input_ids, tokens.attention_mask  # (D, T), (D, T)

    def texts(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of the frames ``rows``, trimmed to the longest text among them."""
        index = self.text_index[rows]  # (B,)
        mask = self.attention_mask[index]  # (B, T)
        length = int(mask.sum(dim=1).max())
        return self.input_ids[index, :length], mask[:, :length]  # (B, t), (B, t)


def collect_pairs(data_dir: Path, split: str, processor: Any) -> PairSet:
    """Every usable frame of ``split`` once (by photo id), its pixels processed once, with its description."""
    seen: set[str] = set()
    images, descriptions = [], []
    for story, story_images in load_vist_split(data_dir, split).iter_usable():
        for frame, image in zip(story.frames, story_images, strict=True):
            if frame.photo_id not in seen:
                seen.add(frame.photo_id)
                images.append(image)
                descriptions.append(frame.description)
    return make_pair_set(images, descriptions, processor)


def make_pair_set(images: Sequence[Any], descriptions: Sequence[str], processor: Any) -> PairSet:
    distinct = sorted(set(descriptions))
    row = {text: i for i, text in enumerate(distinct)}
    if images:
        pixels = processor.image_processor(
            images=list(images), return_tensors="pt"
        ).pixel_values  # (N, 3, H, W)
    else:
        pixels = torch.empty(0, 3, 1, 1)
    pairs = PairSet(pixels, distinct, torch.tensor([row[t] for t in descriptions], dtype=torch.long))
    pairs.tokenize(processor.tokenizer)
    return pairs


def subset(pairs: PairSet, rows: Sequence[int]) -> PairSet:
    picked = torch.tensor(list(rows), dtype=torch.long)
    out = PairSet(pairs.pixels[picked], pairs.descriptions, pairs.text_index[picked])
    out.input_ids, out.attention_mask = pairs.input_ids, pairs.attention_mask
    return out


# --------------------------------------------------------------------------------------------
# The loss and the retrieval accuracy
# --------------------------------------------------------------------------------------------


def embed(model: CLIPModel, pairs: PairSet, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised text and image embeddings of the frames ``rows``: ``(B, D)`` each."""
    input_ids, attention_mask = pairs.texts(rows)  # (B, t), (B, t)
    device = model.logit_scale.device
    text = pooled_features(
        model.get_text_features(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    )  # (B, D)
    image = pooled_features(model.get_image_features(pixel_values=pairs.pixels[rows].to(device)))  # (B, D)
    return F.normalize(text, dim=-1), F.normalize(image, dim=-1)  # (B, D), (B, D)


def contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, text_index: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of normalised ``(B, D)`` text and image embeddings.

    Follows CLIP (Radford et al. 2021, Fig. 3): logits = exp(t) * text @ image^T, cross-entropy along
    both axes, averaged. One departure: frames with identical descriptions (common in ShapeStories) are
    positives of each other, with the target mass spread evenly over them instead of a false negative.
    """
    logits = logit_scale.exp() * text @ image.T  # (B, B): text i vs image j
    same = (text_index[:, None] == text_index[None, :]).float().to(logits.device)  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1; the identity when all differ
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, pairs: PairSet, pool: int) -> dict[str, float | int]:
    """Top-1 retrieval within consecutive pools of ``pool`` frames, text->image and image->text.

    A retrieval is correct when the retrieved frame has the query's description (frames that share a
    description are interchangeable). Pools are taken in order; a last pool smaller than 2 is dropped.
    """
    was_training = model.training
    model.eval()
    correct_t2i = correct_i2t = queries = 0
    chance = 0.0
    for start in range(0, len(pairs), pool):
        rows = torch.arange(start, min(start + pool, len(pairs)))  # (P,)
        if len(rows) < 2:
            break
        text, image = embed(model, pairs, rows)  # (P, D), (P, D)
        similarity = text @ image.T  # (P, P)
        index = pairs.text_index[rows].to(similarity.device)  # (P,)
        same = index[:, None] == index[None, :]  # (P, P)
        correct_t2i += int(same.gather(1, similarity.argmax(dim=1, keepdim=True)).sum())
        correct_i2t += int(same.gather(1, similarity.T.argmax(dim=1, keepdim=True)).sum())
        chance += float((same.sum(dim=1).float() / len(rows)).sum())  # a random pick's success rate
        queries += len(rows)
    model.train(was_training)
    if queries == 0:
        raise ValueError(f"retrieval needs at least 2 frames, got {len(pairs)}")
    return {
        "text_to_image_top1": correct_t2i / queries,
        "image_to_text_top1": correct_i2t / queries,
        "chance": chance / queries,
        "queries": queries,
    }


def _decay_groups(model: CLIPModel, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: biases, norm gains, embeddings and logit_scale are exempt (as CLIP)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        exempt = parameter.ndim < 2 or "embedding" in name or name == "logit_scale"
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_clip(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: ClipTrainConfig,
    resolved_config: Any | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a tiny CLIP from scratch on the train split's (frame, description) pairs; return its metrics.

    Validation uses the ``val`` split when the folder has usable frames there, else a seeded
    ``cfg.val_fraction`` of the train frames, held out. While training, only ``out_dir/checkpoints``
    is written (every ``cfg.checkpoint_every`` steps; ``resume=True`` continues from the newest, exactly
    as the uninterrupted run). At the end ``out_dir`` is written atomically (model, processor,
    ``config.yaml`` with ``resolved_config`` or else ``cfg``, metrics, log); an existing ``out_dir`` that
    is neither an earlier nor an interrupted CLIP run is refused rather than replaced.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    started = time.perf_counter()
    refuse_foreign_folder(out_dir, METRICS_FILE, "train-clip")

    with TrainingRun(
        out_dir, "train-clip", checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
        resume=resume, cpu_threads=cfg.cpu_threads, log_file=False,
    ) as training:  # fmt: skip
        # 1. A fresh tiny CLIP (weights from the seed), then the data, processed once.
        with tempfile.TemporaryDirectory(prefix="tiny-clip-") as staging:
            build_tiny_clip(Path(staging) / "clip", seed=cfg.seed)
            model = CLIPModel.from_pretrained(Path(staging) / "clip")
            processor = CLIPProcessor.from_pretrained(Path(staging) / "clip")
        pairs = collect_pairs(data_dir, "train", processor)
        val_pairs = collect_pairs(data_dir, "val", processor) if sis_path(data_dir, "val").is_file() else None
        has_val = val_pairs is not None and len(val_pairs) >= 2
        if len(pairs) < (2 if has_val else 4):  # a contrastive batch, and without a val split 2 frames more
            raise DataError(
                f"split 'train' of {data_dir} has {len(pairs)} usable frame(s); CLIP training needs at least "
                "2, and 4 when there is no val split to validate on (`storypipe toy-data --out DIR` writes "
                "ShapeStories)"
            )
        if has_val:
            train_pairs, validation = pairs, "the val split"
        else:
            generator = seeded_generator(cfg.seed, "held-out frames")
            order = torch.randperm(len(pairs), generator=generator).tolist()
            held_out = min(max(2, round(len(pairs) * cfg.val_fraction)), len(pairs) - 2)
            val_pairs, train_pairs = (
                subset(pairs, sorted(order[:held_out])),
                subset(pairs, sorted(order[held_out:])),
            )
            validation = f"{held_out} held-out frames of train"

        # 2. AdamW on every parameter, linear warm-up then cosine decay.
        model.to(training.device).train()
        optimizer = torch.optim.AdamW(_decay_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        scheduler = warmup_cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps)
        batch_size = min(cfg.batch_size, len(train_pairs))
        before = retrieval_accuracy(model, val_pairs, cfg.batch_size)
        model, optimizer = training.prepare(model, optimizer)
        training.accelerator.register_for_checkpointing(scheduler)
        start_step = training.start(cfg.max_steps)

        # 3. The loop: step s trains on batch s of the seeded per-epoch order.
        for step in range(start_step, cfg.max_steps):
            rows = torch.tensor(global_batch_indices(step, len(train_pairs), batch_size, cfg.seed))  # (B,)
            text, image = embed(model, train_pairs, rows)  # (B, D), (B, D)
            loss = contrastive_loss(text, image, model.logit_scale, train_pairs.text_index[rows])
            optimizer.zero_grad(set_to_none=True)
            training.accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
            training.log({"step": step + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                          "logit_scale": model.logit_scale.exp().item()})  # fmt: skip
            training.maybe_checkpoint(step + 1)

        # 4. Validate and save, all at once.
        after = retrieval_accuracy(model, val_pairs, cfg.batch_size)
        log = training.records
        tail = [record["loss"] for record in log[-10:]]
        metrics = {
            "train_frames": len(train_pairs),
            "val_frames": len(val_pairs),
            "validation": validation,
            "steps": cfg.max_steps,
            "first_loss": log[0]["loss"],
            "final_loss": sum(tail) / len(tail),  # mean of the last 10 steps
            "val_text_to_image_top1": after["text_to_image_top1"],
            "val_image_to_text_top1": after["image_to_text_top1"],
            "val_chance": after["chance"],
            "val_pool": min(cfg.batch_size, len(val_pairs)),
            "untrained_val_text_to_image_top1": before["text_to_image_top1"],
            "seconds": round(time.perf_counter() - started, 2),
        }
        model.cpu().eval()

        config = resolved_config if resolved_config is not None else cfg
        write_model_folder(out_dir, model, processor, config, log, METRICS_FILE, metrics)
        training.finish()
    return metrics
