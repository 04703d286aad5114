"""Train the tiny text-only LM baseline: the toy analogue of the paper's MPT row (an LM that reads text only).

:class:`eval.baselines.TextOnlyBaseline` prompts a causal LM with ``STORY_PROMPT`` around the previous
story captions, one per line, and keeps the first line it writes greedily. Here the tiny Llama of
:func:`toy.builders.build_tiny_causal_lm` is trained from scratch on one sequence per train story::

    <s>Here is a story, one sentence per line.\\n{caption 0}\\n{caption 1}\\n ... {caption n-1}\\n

Every prefix that ends after a caption's newline is exactly the baseline's prompt for the next caption
(the byte-level BPE never merges across a newline), so one causal-LM pass trains all n-1 predictions.
The loss covers every token; padding is masked.

The output is a plain model folder (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``), with
``config.yaml``, ``text_baseline_metrics.json`` and ``train_log.jsonl`` beside it. While it trains, the
folder holds only ``checkpoints/`` (``pipeline.training.TrainingRun``); a killed run resumes from the
newest with ``resume=True`` and ends exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.baselines import STORY_PROMPT, TextOnlyBaseline
from pipeline.data.vist import load_vist_split, sis_path
from pipeline.errors import DataError
from pipeline.training import (
    TrainingRun,
    global_batch_indices,
    warmup_cosine_schedule,
)
from toy.builders import build_tiny_causal_lm
from toy.config import TextBaselineTrainConfig
from toy.run_folder import refuse_foreign_folder, write_model_folder

METRICS_FILE = "text_baseline_metrics.json"
IGNORE_INDEX = -100  # label of padding positions (the transformers convention)


def story_text(captions: Sequence[str]) -> str:
    """One training sequence: the baseline's prompt over all the captions, each closed by a newline."""
    return STORY_PROMPT.format(story="\n".join(captions))  # STORY_PROMPT ends with the newline


def load_story_texts(data_dir: Path, split: str) -> list[str]:
    """One sequence per story of ``split`` (structural checks only: images are not needed here)."""
    return [story_text([frame.story_caption for frame in story.frames]) for story in load_vist_split(data_dir, split).stories]  # fmt: skip


def tokenize_stories(
    tokenizer: Any, texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids ``(S, T)`` and labels ``(S, T)`` (padding is ``IGNORE_INDEX``)."""
    tokenizer.padding_side = "right"
    tokens = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, IGNORE_INDEX)  # (S, T)
    return tokens.input_ids, labels  # (S, T), (S, T)


def _batch(input_ids: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, device: torch.device):
    """The rows' ids, mask and labels, trimmed to their longest sequence."""
    mask = (labels[rows] != IGNORE_INDEX).long()  # (B, T)
    length = int(mask.sum(dim=1).max())
    return (
        input_ids[rows, :length].to(device),
        mask[:, :length].to(device),
        labels[rows, :length].to(device),
    )


@torch.no_grad()
def mean_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean LM loss over every sequence."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = model.device
    for start in range(0, input_ids.shape[0], batch_size):
        rows = torch.arange(start, min(start + batch_size, input_ids.shape[0]))
        ids, mask, target = _batch(input_ids, labels, rows, device)
        count = int((target[:, 1:] != IGNORE_INDEX).sum())  # positions that predict a token
        total += model(input_ids=ids, attention_mask=mask, labels=target).loss.item() * count
        tokens += count
    model.train(was_training)
    return total / tokens if tokens else math.nan


def train_text_baseline(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: TextBaselineTrainConfig,
    resolved_config: Any | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train the tiny causal LM on the train split's story captions; return its metrics.

    The ``val`` split, when it has stories, gives a held-out loss and a sample continuation. While
    training, only ``out_dir/checkpoints`` is written (every ``cfg.checkpoint_every`` steps;
    ``resume=True`` continues from the newest, exactly as the uninterrupted run). ``out_dir`` is written
    atomically at the end; an existing ``out_dir`` that is neither an earlier nor an interrupted run of
    this function is refused.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    started = time.perf_counter()
    refuse_foreign_folder(out_dir, METRICS_FILE, "train-text-baseline")

    with TrainingRun(
        out_dir, "train-text-baseline", checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints, resume=resume, cpu_threads=cfg.cpu_threads, log_file=False,
    ) as training:  # fmt: skip
        # 1. A fresh tiny LM (weights from the seed) and its tokenizer; the stories as token ids.
        with tempfile.TemporaryDirectory(prefix="tiny-lm-") as staging:
            build_tiny_causal_lm(Path(staging) / "lm", seed=cfg.seed)
            tokenizer = AutoTokenizer.from_pretrained(Path(staging) / "lm")
            model = AutoModelForCausalLM.from_pretrained(Path(staging) / "lm")
        texts = load_story_texts(data_dir, "train")
        if not texts:
            raise DataError(
                f"split 'train' of {data_dir} has no usable story; the text baseline learns from story "
                "captions (`storypipe toy-data --out DIR` writes ShapeStories)"
            )
        val_texts = load_story_texts(data_dir, "val") if sis_path(data_dir, "val").is_file() else []
        max_length = model.config.max_position_embeddings
        input_ids, labels = tokenize_stories(tokenizer, texts, max_length)  # (S, T), (S, T)
        val_ids, val_labels = (
            tokenize_stories(tokenizer, val_texts, max_length) if val_texts else (None, None)
        )

        # 2. AdamW on every parameter, linear warm-up then cosine decay.
        model.to(training.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = warmup_cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps)
        batch_size = min(cfg.batch_size, len(texts))
        model, optimizer = training.prepare(model, optimizer)
        training.accelerator.register_for_checkpointing(scheduler)
        start_step = training.start(cfg.max_steps)

        # 3. The loop: step s trains on batch s of the seeded per-epoch order.
        for step in range(start_step, cfg.max_steps):
            rows = torch.tensor(global_batch_indices(step, len(texts), batch_size, cfg.seed))  # (B,)
            ids, mask, target = _batch(input_ids, labels, rows, training.device)  # (B, t) each
            loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
            optimizer.zero_grad(set_to_none=True)
            training.accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            training.log({"step": step + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
            training.maybe_checkpoint(step + 1)

        # 4. Validate (held-out loss, one sample continuation) and save, all at once.
        model.eval()
        log = training.records
        tail = [record["loss"] for record in log[-10:]]
        metrics: dict[str, Any] = {
            "train_stories": len(texts),
            "steps": cfg.max_steps,
            "first_loss": log[0]["loss"],
            "final_loss": sum(tail) / len(tail),  # mean of the last 10 steps
            "val_stories": len(val_texts),
            "val_loss": mean_loss(model, val_ids, val_labels, cfg.batch_size)
            if val_ids is not None
            else None,
        }
        sample_story = load_vist_split(data_dir, "val" if val_texts else "train").stories[0]
        prompt = [frame.story_caption for frame in sample_story.frames[:2]]
        metrics["sample"] = {"previous": prompt, "next": TextOnlyBaseline(model, tokenizer)(prompt)}
        metrics["seconds"] = round(time.perf_counter() - started, 2)
        model.cpu()

        config = resolved_config if resolved_config is not None else cfg
        write_model_folder(out_dir, model, tokenizer, config, log, METRICS_FILE, metrics)
        training.finish()
    return metrics
